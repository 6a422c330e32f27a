"""Routing statistics of a training step from every pipeline stage and data-parallel rank."""
from __future__ import annotations


def global_router_metrics(model, cfg, device) -> dict:
    """Summary router metrics (``moe/...``, no per-layer keys) of the whole model since the last
    call: the sums of each rank's MoE layers, added over the world. TP ranks (and sequence-parallel
    ones, which route the gathered tokens) see the same tokens, so only TP rank 0 contributes."""
    from megatron_jai.moe.layer import global_router_table, summarize_router_table

    table = global_router_table(model, cfg.num_layers, cfg.num_experts, device)
    metrics = summarize_router_table(table.cpu(), cfg.moe_top_k)
    return {k: v for k, v in metrics.items() if "/layer" not in k}
