"""The experts of one MoE layer on this expert-parallel and tensor-parallel rank.

Experts are split over EP (the experts axis) and over tensor parallelism along the FFN dimension F
(expert TP = TP, Megatron-Core's default). With ``F_tp = F / tp``, TP rank ``t`` holds columns
``t*F_tp ... (t+1)*F_tp - 1`` of every local expert:

* ``weight_gate_up`` ``[E_local, 2*F_tp, H]`` = ``[gate rows of its columns; up rows of its columns]``;
* ``weight_down`` ``[E_local, H, F_tp]``.

SwiGLU is elementwise per column, so :func:`megatron_jai.moe.functional.grouped_expert_ffn` on the
local slices gives this rank's partial output; the layer sums the partials over TP (see
:mod:`megatron_jai.moe.layer`).

Checkpoint: both tensors are stored with their global shape (exactly as with TP = 1), so a
checkpoint saved at any EP/TP loads at any other::

    decoder.layers.mlp.experts.weight_gate_up  [L, E, 2F, H]   rows [gate; up] per expert
    decoder.layers.mlp.experts.weight_down     [L, E, H, F]

``weight_gate_up`` goes through a ``ShardedTensorFactory`` (like Megatron's
``apply_swiglu_sharded_factory`` for ``linear_fc1``, on the F axis after the experts axis): each TP
rank stores its gate rows at ``t*F_tp`` and its up rows at ``F + t*F_tp``. Expert parameters carry
``allreduce = False`` (Megatron-Core's marker): their gradients are reduced over the
expert-data-parallel group, not the data-parallel group; and ``tensor_model_parallel = True``
(split over TP along ``partition_dim``), so the gradient norm counts the shards of every TP rank.
"""
from __future__ import annotations

import torch
from megatron.core import parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.transformer.module import MegatronModule

from megatron_jai.moe.functional import grouped_expert_ffn

EXPERT_WEIGHTS = ("weight_gate_up", "weight_down")


class GroupedExperts(MegatronModule):
    def __init__(self, config, num_experts: int, ffn_hidden_size: int, ep_size: int, ep_rank: int,
                 recompute_activation: bool = False, tp_size: int = None, tp_rank: int = None):
        super().__init__(config)
        if num_experts % ep_size:
            raise ValueError(f"expert parallel size {ep_size} must divide the number of experts "
                             f"{num_experts}")
        if tp_size is None:  # default: the F axis is split over Megatron's TP group (ETP = TP)
            tp_size, tp_rank = (parallel_state.get_tensor_model_parallel_world_size(),
                                parallel_state.get_tensor_model_parallel_rank())
        elif tp_rank is None or not 0 <= tp_rank < tp_size:
            raise ValueError(f"tp_rank must be in [0, {tp_size}), got {tp_rank}")
        if ffn_hidden_size % tp_size:
            raise ValueError(f"tensor parallel size {tp_size} must divide the expert FFN size "
                             f"{ffn_hidden_size}")
        self.num_experts = num_experts
        self.num_local_experts = num_experts // ep_size
        self.ep_size, self.ep_rank = ep_size, ep_rank
        self.tp_size, self.tp_rank = tp_size, tp_rank
        self.ffn_hidden_size = ffn_hidden_size
        self.local_ffn = ffn_hidden_size // tp_size
        self.recompute_activation = recompute_activation
        hidden = config.hidden_size
        device = None if config.use_cpu_initialization else torch.cuda.current_device()
        self.weight_gate_up = torch.nn.Parameter(torch.empty(
            self.num_local_experts, 2 * self.local_ffn, hidden, dtype=config.params_dtype,
            device=device))
        self.weight_down = torch.nn.Parameter(torch.empty(
            self.num_local_experts, hidden, self.local_ffn, dtype=config.params_dtype, device=device))
        if config.perform_initialization:
            self._initialize(config)
        for p, dim in ((self.weight_gate_up, 1), (self.weight_down, 2)):
            p.allreduce = False  # reduced over the expert-data-parallel group
            # Split over TP, not a TP replica: the gradient norm (clipping) counts every shard.
            set_tensor_model_parallel_attributes(p, True, dim, 1)

    def local_slices(self, full_gate_up: torch.Tensor, full_down: torch.Tensor):
        """This rank's slices of full weights ``[E, 2F, H]``, ``[E, H, F]`` (all experts)."""
        lo, hi = self.ep_rank * self.num_local_experts, (self.ep_rank + 1) * self.num_local_experts
        f, c0 = self.ffn_hidden_size, self.tp_rank * self.local_ffn
        c1 = c0 + self.local_ffn
        gate_up = torch.cat([full_gate_up[lo:hi, c0:c1], full_gate_up[lo:hi, f + c0:f + c1]], dim=1)
        return gate_up, full_down[lo:hi, :, c0:c1]

    def _initialize(self, config):
        if config.use_cpu_initialization:
            # Like Megatron's CPU init: draw all E experts at full width from the default generator
            # (seeded alike on every rank) and keep this rank's slice, so the weights depend on
            # neither EP nor TP.
            masters = []
            for param, init in ((self.weight_gate_up, config.init_method),
                                (self.weight_down, config.output_layer_init_method)):
                shape = (2 * self.ffn_hidden_size, config.hidden_size) if param is self.weight_gate_up \
                    else (config.hidden_size, self.ffn_hidden_size)
                master = torch.empty((self.num_experts,) + shape, dtype=torch.float32)
                for w in master:
                    init(w)
                masters.append(master)
            gate_up, down = self.local_slices(*masters)
            with torch.no_grad():
                self.weight_gate_up.copy_(gate_up)
                self.weight_down.copy_(down)
            return
        from megatron.core.tensor_parallel.random import (
            get_cuda_rng_tracker,
            get_expert_parallel_rng_tracker_name,
        )

        # On the GPU: Megatron's expert-parallel RNG stream, seeded per EP and expert-TP rank (the
        # same on expert-data-parallel replicas), each rank drawing its own shard like Megatron's
        # GPU init of tensor-parallel weights.
        with get_cuda_rng_tracker().fork(get_expert_parallel_rng_tracker_name()):
            for w in self.weight_gate_up:
                config.init_method(w)
            for w in self.weight_down:
                config.output_layer_init_method(w)

    def forward(self, hidden: torch.Tensor, expert_ids: torch.Tensor,
                weights: torch.Tensor) -> torch.Tensor:
        """hidden ``[N, H]``, expert_ids ``[N, k]`` local ids (-1 = skip), weights ``[N, k]`` ->
        this TP rank's partial output ``[N, H]`` (its F columns; the layer sums over TP)."""
        if hidden.shape[0] == 0:
            # No token reached this rank's experts. Keep the output attached to the (empty) input,
            # so backward runs the all-to-all on every rank, and give the experts a zero gradient,
            # so gradient reduction and the optimizer see the same parameters everywhere.
            anchor = self.weight_gate_up.view(-1)[:1].sum() + self.weight_down.view(-1)[:1].sum()
            return hidden * 0 + 0 * anchor.to(hidden.dtype)
        return grouped_expert_ffn(hidden, expert_ids, weights, self.weight_gate_up,
                                  self.weight_down, recompute_activation=self.recompute_activation)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata=None):
        prepend = len(sharded_offsets)
        expert_axis = (prepend, self.ep_rank, self.ep_size)
        # Sharded over EP and TP: replicas are the expert-data-parallel ranks only.
        replica_id = (0, 0, parallel_state.get_expert_data_parallel_rank())
        tp, t = self.tp_size, self.tp_rank
        key = f"{prefix}weight_down"
        out = {key: ShardedTensor.from_rank_offsets(
            key, self.weight_down, *sharded_offsets, expert_axis, (prepend + 2, t, tp),
            replica_id=replica_id, prepend_axis_num=prepend)}

        # weight_gate_up: the local [gate; up] halves go to rows t*F_tp and F + t*F_tp of [.., 2F, H].
        def build(key, data, replica_id, flattened_range):
            gate, up = torch.chunk(data, 2, dim=1)
            return [ShardedTensor.from_rank_offsets(
                key, half, *sharded_offsets, expert_axis, (prepend + 1, t + shift, 2 * tp),
                replica_id=replica_id, prepend_axis_num=prepend)
                for half, shift in ((gate, 0), (up, tp))]

        def merge(halves):
            with torch.no_grad():
                return torch.cat(halves, dim=1)

        key = f"{prefix}weight_gate_up"
        out[key] = ShardedTensorFactory(key, self.weight_gate_up, build, merge, replica_id)
        return out
