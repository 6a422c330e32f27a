"""Expert-parallel token dispatch: all-to-all over Megatron-Core's expert-parallel group.

Each EP rank owns ``E / ep`` consecutive experts (rank ``r``: global experts
``r * E_local ... (r + 1) * E_local - 1``). For the ``T`` tokens of this rank with ``k`` routing
choices each (``T * k`` slots; dropped slots have expert id -1):

1. ``dispatch``: sort the slots by global expert (stable; the routing-metadata op of
   :mod:`megatron_jai.moe.functional`), which groups them by destination rank; exchange the
   per-expert counts with one all-to-all (so every rank knows how many rows it receives per local
   expert and from whom), then the token rows with a second (uneven) all-to-all.
2. the experts run on the received rows, one (local expert) choice per row, unweighted;
3. ``combine``: the reverse all-to-all brings the expert outputs home; each output is multiplied by
   its routing weight (fp32) and the ``k`` choices of every token are summed.

Both all-to-alls are Megatron-Core's differentiable ``tensor_parallel.all_to_all``, so gradients of
the hidden states, the expert weights and the routing weights flow back through the same exchange.
Works with NCCL and gloo. With ``ep == 1`` dispatch is the identity and the experts apply the routing
weights themselves (the fused kernel path).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist


@dataclass
class Dispatched:
    """What the experts of this rank receive: ``hidden`` ``[R, H]``, ``expert_ids`` ``[R, k']``
    (local expert index, -1 = skip) and ``weights`` ``[R, k']`` (k' = k for ep == 1, else 1)."""

    hidden: torch.Tensor
    expert_ids: torch.Tensor
    weights: torch.Tensor
    # Bookkeeping for combine (ep > 1 only).
    send_slots: Optional[torch.Tensor] = None  # [S] slots in the order they were sent
    send_weights: Optional[torch.Tensor] = None  # [S] their routing weights (fp32, differentiable)
    send_splits: Optional[list] = None  # rows sent to each EP rank
    recv_splits: Optional[list] = None  # rows received from each EP rank
    num_tokens: int = 0
    top_k: int = 0


class AllToAllDispatcher:
    """Token dispatcher over the expert-parallel process group ``group`` (None: no EP)."""

    def __init__(self, num_experts: int, group: Optional[dist.ProcessGroup] = None):
        self.group = group
        self.ep_size = 1 if group is None else dist.get_world_size(group)
        self.ep_rank = 0 if group is None else dist.get_rank(group)
        if num_experts % self.ep_size:
            raise ValueError(f"expert parallel size {self.ep_size} must divide the number of "
                             f"experts {num_experts}")
        self.num_experts = num_experts
        self.num_local_experts = num_experts // self.ep_size

    def dispatch(self, hidden: torch.Tensor, expert_ids: torch.Tensor,
                 weights: torch.Tensor) -> Dispatched:
        """hidden ``[T, H]``, expert_ids ``[T, k]`` (global ids, -1 = dropped), weights ``[T, k]``."""
        if self.ep_size == 1:
            return Dispatched(hidden, expert_ids, weights)
        from megatron.core.tensor_parallel import all_to_all

        from megatron_jai.moe.functional import routing_metadata

        num_tokens, top_k = expert_ids.shape
        ep, local = self.ep_size, self.num_local_experts
        meta = routing_metadata(expert_ids, self.num_experts)
        # Counts first: row r of recv_counts = rows rank r sends us, per local expert.
        send_counts = meta.tokens_per_expert.view(ep, local)
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=self.group)
        # One host synchronisation: the split sizes of the uneven all-to-all.
        splits = torch.stack([send_counts.sum(1), recv_counts.sum(1)]).tolist()
        send_splits, recv_splits = splits
        num_sent = sum(send_splits)
        send_slots = meta.sorted_slots[:num_sent]
        send_hidden = hidden.index_select(0, torch.div(send_slots, top_k, rounding_mode="floor"))
        send_weights = weights.reshape(-1).index_select(0, send_slots)
        recv_hidden = all_to_all(self.group, send_hidden, recv_splits, send_splits)
        # Received rows are grouped by source rank, then by local expert within each source.
        recv_ids = torch.repeat_interleave(
            torch.arange(local, device=hidden.device).repeat(ep), recv_counts.reshape(-1))
        ones = torch.ones(recv_ids.shape[0], 1, dtype=torch.float32, device=hidden.device)
        return Dispatched(recv_hidden, recv_ids[:, None], ones, send_slots=send_slots,
                          send_weights=send_weights, send_splits=send_splits,
                          recv_splits=recv_splits, num_tokens=num_tokens, top_k=top_k)

    def combine(self, expert_output: torch.Tensor, d: Dispatched) -> torch.Tensor:
        """expert outputs for ``d.hidden``'s rows -> ``[T, H]`` for this rank's tokens."""
        if self.ep_size == 1:
            return expert_output
        from megatron.core.tensor_parallel import all_to_all

        returned = all_to_all(self.group, expert_output, d.send_splits, d.recv_splits)
        weighted = returned.float() * d.send_weights[:, None]
        # Slots are unique, so this scatter is deterministic; dropped slots stay zero.
        per_slot = weighted.new_zeros(d.num_tokens * d.top_k, weighted.shape[1])
        per_slot = per_slot.index_copy(0, d.send_slots, weighted)
        out = per_slot.view(d.num_tokens, d.top_k, -1).sum(1)
        return out.to(expert_output.dtype)
