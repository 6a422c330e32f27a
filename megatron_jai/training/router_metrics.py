"""Routing statistics of a training step from every pipeline stage and data-parallel rank."""
from __future__ import annotations

import torch
import torch.distributed as dist


def global_router_metrics(model, cfg, device) -> dict:
    """Summary router metrics (``moe/...``, no per-layer keys) of the whole model since the last
    call: the sums of each rank's MoE layers, added over the world. TP ranks (and sequence-parallel
    ones, which route the gathered tokens) see the same tokens, so only TP rank 0 contributes."""
    from megatron.core import parallel_state as ps

    from megatron_jai.moe.layer import router_stat_table, summarize_router_table
    from megatron_jai.moe.router import RouterStats

    width = len(RouterStats.FIELDS) + cfg.num_experts
    table, _ = router_stat_table(model, cfg.num_layers)
    table = table.to(device)
    if table.shape[1] != width:  # no MoE layer on this stage: the right width for the all-reduce
        table = torch.zeros(cfg.num_layers, width, dtype=torch.float64, device=device)
    if ps.get_tensor_model_parallel_rank() != 0:
        table.zero_()
    dist.all_reduce(table)
    metrics = summarize_router_table(table.cpu(), cfg.moe_top_k)
    return {k: v for k, v in metrics.items() if "/layer" not in k}
