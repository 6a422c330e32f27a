"""The experts of one MoE layer on this expert-parallel rank: one tensor per projection.

``weight_gate_up`` ``[E_local, 2F, H]`` (rows ``[gate; up]``, Megatron's ``linear_fc1`` layout) and
``weight_down`` ``[E_local, H, F]``; the FFN itself is
:func:`megatron_jai.moe.functional.grouped_expert_ffn` (Triton grouped GEMMs on GPU, the torch
reference on CPU unless ``TRITON_INTERPRET=1``).

Checkpoint: both tensors are stored with their global shape, the experts axis split over the EP
ranks, so a checkpoint saved at any EP loads at any other::

    decoder.layers.mlp.experts.weight_gate_up  [L, E, 2F, H]
    decoder.layers.mlp.experts.weight_down     [L, E, H, F]

Experts are not split over tensor parallelism: TP ranks hold (and compute) full copies, marked as
replicas in the checkpoint. Expert parameters carry ``allreduce = False`` (Megatron-Core's marker):
their gradients are reduced over the expert-data-parallel group, not the data-parallel group.
"""
from __future__ import annotations

import torch
from megatron.core import parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedTensor
from megatron.core.transformer.module import MegatronModule

from megatron_jai.moe.functional import grouped_expert_ffn

EXPERT_WEIGHTS = ("weight_gate_up", "weight_down")


class GroupedExperts(MegatronModule):
    def __init__(self, config, num_experts: int, ffn_hidden_size: int, ep_size: int, ep_rank: int,
                 recompute_activation: bool = False):
        super().__init__(config)
        if num_experts % ep_size:
            raise ValueError(f"expert parallel size {ep_size} must divide the number of experts "
                             f"{num_experts}")
        self.num_experts = num_experts
        self.num_local_experts = num_experts // ep_size
        self.ep_size, self.ep_rank = ep_size, ep_rank
        self.recompute_activation = recompute_activation
        hidden, ffn = config.hidden_size, ffn_hidden_size
        device = None if config.use_cpu_initialization else torch.cuda.current_device()
        self.weight_gate_up = torch.nn.Parameter(torch.empty(
            self.num_local_experts, 2 * ffn, hidden, dtype=config.params_dtype, device=device))
        self.weight_down = torch.nn.Parameter(torch.empty(
            self.num_local_experts, hidden, ffn, dtype=config.params_dtype, device=device))
        if config.perform_initialization:
            self._initialize(config)
        for p in (self.weight_gate_up, self.weight_down):
            p.allreduce = False  # reduced over the expert-data-parallel group

    def _initialize(self, config):
        if config.use_cpu_initialization:
            # Like Megatron's CPU init: draw all E experts from the default generator (seeded alike
            # on every rank) and keep this rank's slice, so the weights do not depend on EP.
            lo, hi = self.ep_rank * self.num_local_experts, (self.ep_rank + 1) * self.num_local_experts
            for param, init in ((self.weight_gate_up, config.init_method),
                                (self.weight_down, config.output_layer_init_method)):
                master = torch.empty((self.num_experts,) + tuple(param.shape[1:]), dtype=torch.float32)
                for w in master:
                    init(w)
                with torch.no_grad():
                    param.copy_(master[lo:hi])
            return
        from megatron.core.tensor_parallel.random import (
            get_cuda_rng_tracker,
            get_expert_parallel_rng_tracker_name,
        )

        # On the GPU: Megatron's expert-parallel RNG stream (same seed on expert-data-parallel
        # replicas, a different one on each EP rank).
        with get_cuda_rng_tracker().fork(get_expert_parallel_rng_tracker_name()):
            for w in self.weight_gate_up:
                config.init_method(w)
            for w in self.weight_down:
                config.output_layer_init_method(w)
        # That stream is also seeded by the expert-tensor-parallel rank, which defaults to the TP
        # rank; but TP ranks hold full replicas of these experts (fed the same tokens, saved once):
        # give them TP rank 0's draw, or their outputs would differ across the TP group.
        if parallel_state.get_tensor_model_parallel_world_size() > 1:
            for param in (self.weight_gate_up, self.weight_down):
                torch.distributed.broadcast(param.data, parallel_state.get_tensor_model_parallel_src_rank(),
                                            group=parallel_state.get_tensor_model_parallel_group())

    def forward(self, hidden: torch.Tensor, expert_ids: torch.Tensor,
                weights: torch.Tensor) -> torch.Tensor:
        """hidden ``[N, H]``, expert_ids ``[N, k]`` local ids (-1 = skip), weights ``[N, k]``."""
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
        replica_id = (0, parallel_state.get_tensor_model_parallel_rank(),
                      parallel_state.get_expert_data_parallel_rank())
        out = {}
        for name in EXPERT_WEIGHTS:
            key = f"{prefix}{name}"
            out[key] = ShardedTensor.from_rank_offsets(
                key, getattr(self, name), *sharded_offsets, (prepend, self.ep_rank, self.ep_size),
                replica_id=replica_id, prepend_axis_num=prepend)
        return out
