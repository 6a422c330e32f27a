"""The MoE layer for the MLP slot of Megatron-Core's ``TransformerLayer``.

``moe_layer_spec(cfg, use_te)`` is what :func:`megatron_jai.model.spec.layer_spec` puts in the MLP
slot when ``cfg.num_experts > 0``. The layer = :class:`~megatron_jai.moe.router.TopKRouter`
(fp32) -> :class:`~megatron_jai.moe.dispatcher.AllToAllDispatcher` (expert parallelism over
``parallel_state.get_expert_model_parallel_group()``) ->
:class:`~megatron_jai.moe.experts.GroupedExperts` (Triton grouped GEMMs) -> combine.

The router's load-balancing and z losses ride on the autograd graph (Megatron-Core's
``MoEAuxLossAutoScaler``; its pipeline schedules set the scale to 1/num_microbatches), so a training
loop needs nothing MoE-specific for them. Two helpers for training loops:

* :func:`collect_router_stats` -- per-layer and summary routing statistics (read and reset);
* :func:`update_expert_biases` -- the aux-loss-free balancing step, once per optimizer step, only
  when the config has ``moe_expert_bias``.

Experts are split over tensor parallelism along their FFN dimension (expert TP = TP; see
:mod:`megatron_jai.moe.experts`), so every TP rank routes the same tokens and computes a partial
output (its F columns):

* without sequence parallelism the tokens are replicated over TP: the expert input rows and the
  routing weights enter through ``copy_to_tensor_model_parallel_region`` (their gradients are
  partial, all-reduced in backward) and the output is summed with
  ``reduce_from_tensor_model_parallel_region``; the router gradient is complete on every rank;
* with sequence parallelism (``config.sequence_parallel``) the layer's input and output are
  ``[s/TP, b, H]``: the tokens are gathered along the sequence over TP before routing
  (``gather_from_sequence_parallel_region``, reduce-scatter in backward) and the partial outputs
  are reduce-scattered back (``reduce_scatter_to_sequence_parallel_region``). Every gradient inside
  is then partial per TP rank, the router's too: its weight carries Megatron's
  ``sequence_parallel`` marker, so ``finalize_model_grads`` sums it over TP like the layer norms',
  and each rank attaches 1/TP of the load-balancing and z losses. Routing, capacity and the losses
  see the whole sequence, exactly as at TP = 1.

Checkpoint keys (global shapes; the experts axis is split over EP ranks, F over TP ranks)::

    decoder.layers.mlp.router.weight           [L, E, H]
    decoder.layers.mlp.router.expert_bias      [L, E]        (only with moe_expert_bias)
    decoder.layers.mlp.experts.weight_gate_up  [L, E, 2F, H]  rows [gate; up]
    decoder.layers.mlp.experts.weight_down     [L, E, H, F]
"""
from __future__ import annotations

import logging
from typing import Iterable, Optional, Union

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
)
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_jai.moe.dispatcher import AllToAllDispatcher
from megatron_jai.moe.experts import GroupedExperts
from megatron_jai.moe.router import RouterOptions, RouterStats, TopKRouter


class JaiMoELayer(MegatronModule):
    """Router + expert-parallel dispatcher + grouped experts. ``forward(hidden [s, b, H],
    padding_mask [b, s] (True = padding) = None) -> (output [s, b, H], None)``; with sequence
    parallelism ``s`` is this rank's ``s/TP`` (the padding mask may be local or whole)."""

    def __init__(self, config, options: RouterOptions, ffn_hidden_size: int,
                 recompute_activation: bool = False):
        super().__init__(config)
        self.options = options
        self.layer_number = None
        # Megatron's selective recompute of the MoE activation ("moe_act") maps onto the kernels'
        # SwiGLU recompute (only the pre-activation is kept for backward).
        recompute_activation = recompute_activation or (
            config.recompute_granularity == "selective" and "moe_act" in (config.recompute_modules or ()))
        ep_size = parallel_state.get_expert_model_parallel_world_size()
        ep_rank = parallel_state.get_expert_model_parallel_rank()
        ep_group = parallel_state.get_expert_model_parallel_group() if ep_size > 1 else None
        self.router = TopKRouter(config, options)
        self.dispatcher = AllToAllDispatcher(options.num_experts, ep_group)
        self.experts = GroupedExperts(config, options.num_experts, ffn_hidden_size, ep_size,
                                      ep_rank, recompute_activation)

    def set_layer_number(self, layer_number: int) -> None:
        self.layer_number = layer_number
        self.router.set_layer_number(layer_number)

    def forward(self, hidden_states: torch.Tensor, padding_mask: Optional[torch.Tensor] = None,
                **unused):
        tp = self.experts.tp_size
        sequence_parallel = self.config.sequence_parallel and tp > 1
        if sequence_parallel:
            local_seq = hidden_states.shape[0]
            hidden_states = gather_from_sequence_parallel_region(hidden_states)
            if padding_mask is not None and padding_mask.shape[1] == local_seq:
                # GPTModel scatters the mask along the sequence too (first pipeline stage only).
                padding_mask = gather_from_sequence_parallel_region(
                    padding_mask.t().to(torch.uint8).contiguous()).t().bool()
        seq, batch, hidden = hidden_states.shape
        tokens = hidden_states.reshape(-1, hidden)
        token_mask = None
        if padding_mask is not None:  # [b, s] True = padding -> [s * b] True = real token
            token_mask = ~padding_mask.transpose(0, 1).reshape(-1).bool()
        routing = self.router(tokens, token_mask, tp_replicas=tp if sequence_parallel else 1)
        expert_in, weights = tokens, routing.weights
        if tp > 1 and not sequence_parallel:
            # Replicated tokens, partial outputs: the gradients of the expert input rows and of the
            # routing weights are partial too (all-reduced in backward).
            expert_in = copy_to_tensor_model_parallel_region(tokens)
            weights = copy_to_tensor_model_parallel_region(weights)
        dispatched = self.dispatcher.dispatch(expert_in, routing.expert_ids, weights)
        expert_out = self.experts(dispatched.hidden, dispatched.expert_ids, dispatched.weights)
        out = self.dispatcher.combine(expert_out, dispatched).view(seq, batch, hidden)
        if sequence_parallel:
            out = reduce_scatter_to_sequence_parallel_region(out)
        elif tp > 1:
            out = reduce_from_tensor_model_parallel_region(out)
        return out, None


def router_options(cfg) -> RouterOptions:
    """The router options of a :class:`~megatron_jai.config.ModelConfig`."""
    return RouterOptions(
        num_experts=cfg.num_experts,
        top_k=cfg.moe_top_k,
        normalize_topk=cfg.moe_normalize_topk,
        aux_loss_coeff=cfg.moe_aux_loss_coeff,
        z_loss_coeff=cfg.moe_z_loss_coeff,
        capacity_factor=cfg.moe_capacity_factor,
        drop_policy=cfg.moe_token_drop_policy,
        expert_bias=cfg.moe_expert_bias,
        expert_bias_update_rate=cfg.moe_expert_bias_update_rate,
    )


class _UnknownMlpSpecFilter(logging.Filter):
    """TransformerLayer warns "Unknown MLP type ... Using default kwargs" for every MLP spec that is
    not one of Megatron's own classes; for this layer the default kwargs are the right ones."""

    def filter(self, record):
        return "Unknown MLP type" not in record.getMessage()


def _silence_unknown_mlp_warning() -> None:
    log = logging.getLogger("megatron.core.transformer.transformer_layer")
    if not any(isinstance(f, _UnknownMlpSpecFilter) for f in log.filters):
        log.addFilter(_UnknownMlpSpecFilter())


def moe_layer_spec(cfg, use_te: bool = False) -> ModuleSpec:
    """The MLP-slot spec for an MoE config. The layer holds no Transformer Engine modules (the
    experts are Triton kernels), so the spec is the same with or without TE; ``use_te`` is accepted
    for symmetry with the dense spec."""
    if not cfg.is_moe:
        raise ValueError(f"config {cfg.name!r} has no experts (num_experts = 0)")
    _silence_unknown_mlp_warning()
    return ModuleSpec(module=JaiMoELayer, params={
        "options": router_options(cfg),
        "ffn_hidden_size": cfg.expert_ffn_hidden_size,
    })


# ---- helpers for training loops --------------------------------------------------------------

def _routers(model: Union[torch.nn.Module, Iterable[torch.nn.Module]]) -> list:
    chunks = [model] if isinstance(model, torch.nn.Module) else list(model)
    routers = [m for chunk in chunks for m in chunk.modules() if isinstance(m, TopKRouter)]
    return sorted(routers, key=lambda r: r.layer_number or 0)


def router_stat_table(model, num_layers: int, reset: bool = True) -> tuple:
    """This rank's routing sums since the last reset as one tensor ``[num_layers, F + E]`` (row =
    global layer; ``F`` = :attr:`RouterStats.FIELDS`, then tokens per expert; zero rows for
    layers elsewhere), plus top-k. Summing it over ranks (all-reduce) gives the whole model's."""
    routers = _routers(model)
    top_k = routers[0].options.top_k if routers else 1
    num_experts = routers[0].options.num_experts if routers else 0
    n_fields = len(RouterStats.FIELDS)
    device = routers[0].weight.device if routers else "cpu"
    table = torch.zeros(num_layers, n_fields + num_experts, dtype=torch.float64, device=device)
    for router in routers:
        stats = router.stats
        if stats.sums is not None:
            row = (router.layer_number or 1) - 1
            table[row, :n_fields] += stats.sums
            table[row, n_fields:] += stats.tokens_per_expert
        if reset:
            stats.reset()
    return table, top_k


def global_router_table(model, num_layers: int, num_experts: int, device) -> torch.Tensor:
    """:func:`router_stat_table` (reset) summed over every rank of the job: each pipeline stage adds
    its layers, data-parallel ranks their tokens; TP ranks (and sequence-parallel ones, which route
    the gathered tokens) see the same tokens, so only TP rank 0 contributes. Collective."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    width = len(RouterStats.FIELDS) + num_experts
    table, _ = router_stat_table(model, num_layers)
    table = table.to(device)
    if table.shape[1] != width:  # no MoE layer on this stage: the right width for the all-reduce
        table = torch.zeros(num_layers, width, dtype=torch.float64, device=device)
    if ps.get_tensor_model_parallel_rank() != 0:
        table.zero_()
    dist.all_reduce(table)
    return table


def expert_load(table: torch.Tensor) -> list:
    """Per layer of a router table, the share of the routed token slots each expert took."""
    counts = table[:, len(RouterStats.FIELDS):]
    return [(row / row.sum()).tolist() if row.sum() > 0 else [0.0] * len(row) for row in counts]


def summarize_router_table(table: torch.Tensor, top_k: int) -> dict:
    """Routing statistics from a :func:`router_stat_table` (see :func:`collect_router_stats`)."""
    out, layers = {}, []
    n_fields = len(RouterStats.FIELDS)
    for row, values in enumerate(table.tolist()):
        s = dict(zip(RouterStats.FIELDS, values[:n_fields]))
        if not s["calls"]:
            continue
        counts = torch.tensor(values[n_fields:], dtype=torch.float64)
        slots = s["tokens"] * top_k
        kept = float(counts.sum())
        name = f"moe/layer{row + 1:02d}"
        for e, c in enumerate(counts.tolist()):
            out[f"{name}/load_e{e}"] = c / kept if kept else 0.0
        out[f"{name}/entropy"] = s["entropy_sum"] / s["calls"]
        out[f"{name}/dropped_fraction"] = s["dropped_slots"] / slots if slots else 0.0
        layers.append((s, counts, slots))
    if layers:
        n_calls = sum(s["calls"] for s, _, _ in layers)
        all_slots = sum(slots for _, _, slots in layers)
        out["moe/aux_loss"] = sum(s["aux_loss_sum"] for s, _, _ in layers) / n_calls
        out["moe/z_loss"] = sum(s["z_loss_sum"] for s, _, _ in layers) / n_calls
        out["moe/entropy"] = sum(s["entropy_sum"] for s, _, _ in layers) / n_calls
        out["moe/dropped_fraction"] = (sum(s["dropped_slots"] for s, _, _ in layers) / all_slots
                                       if all_slots else 0.0)
        out["moe/max_load"] = max(float(c.max() / c.mean()) if c.sum() > 0 else 0.0
                                  for _, c, _ in layers)
        # Tokens routed per layer of the table (summed over forward calls): the global batch's
        # tokens when every stage and data-parallel rank contributed.
        out["moe/tokens_per_layer"] = sum(s["tokens"] for s, _, _ in layers) / table.shape[0]
    return out


def collect_router_stats(model, reset: bool = True) -> dict:
    """Routing statistics of this rank's MoE layers since the last call, as a flat dict of floats
    (empty when the model has no MoE layer or nothing was routed):

    * ``moe/aux_loss``, ``moe/z_loss`` -- mean over layers and forward passes (coefficient included;
      only training forwards compute them);
    * ``moe/entropy`` -- mean routing entropy (nats; ln E = uniform);
    * ``moe/dropped_fraction`` -- dropped slots / routed slots (0 when dropless);
    * ``moe/max_load`` -- max over layers and experts of load / mean load (1 = perfectly balanced);
    * ``moe/tokens_per_layer`` -- tokens routed per layer (of the layers up to the last seen);
    * per layer ``moe/layer{NN}/load_e{e}`` (fraction of the layer's slots that expert e took),
      ``moe/layer{NN}/entropy``, ``moe/layer{NN}/dropped_fraction``.

    Local to this rank (no communication; the training loop sums :func:`router_stat_table` over
    every stage and rank instead). ``model``: a module or a list of model chunks.
    """
    routers = _routers(model)
    if not routers:
        return {}
    num_layers = max(r.layer_number or 1 for r in routers)
    table, top_k = router_stat_table(model, num_layers, reset)
    return summarize_router_table(table.cpu(), top_k)

@torch.no_grad()
def update_expert_biases(model, group: Optional[dist.ProcessGroup] = None) -> int:
    """Aux-loss-free load balancing: after each optimizer step, sum every router's token counts
    over ``group`` (default: Megatron's tensor+data-parallel group, i.e. all replicas of this
    pipeline stage) and move its expert bias toward balance. Collective over ``group``; a no-op
    (returning 0) for models without expert bias. Returns the number of routers updated."""
    routers = [r for r in _routers(model) if r.options.expert_bias]
    if not routers:
        return 0
    counts = torch.stack([r.local_tokens_per_expert for r in routers])
    if dist.is_initialized():
        if group is None:
            group = parallel_state.get_tensor_and_data_parallel_group(with_context_parallel=True)
        dist.all_reduce(counts, group=group)
    for router, c in zip(routers, counts):
        router.update_expert_bias(c)
    return len(routers)
