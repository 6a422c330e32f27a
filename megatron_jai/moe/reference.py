"""Plain-torch reference of the MoE expert computation: the ground truth the kernels are tested against.

Conventions shared by the reference, the C++/CUDA routing op (``megatron_jai.kernels.routing``) and
the Triton expert kernels (``megatron_jai.kernels.moe_grouped_gemm``):

* A token ``n`` with ``k`` routing choices owns the *slots* ``s = n * k + j`` (``j < k``), i.e. the
  flattened ``expert_ids`` ``[N, k]``.
* ``expert_ids`` holds *local* expert indices. Any id outside ``[0, num_experts)`` -- by convention
  ``-1`` -- marks a slot that is skipped: a token dropped by the capacity factor, or routed to an
  expert that lives on another expert-parallel rank. Skipped slots contribute nothing.
* Routing metadata is the stable sort of the slots by expert id, with skipped slots sorted after all
  experts (as if their id were ``num_experts``):

  - ``tokens_per_expert`` ``[E]``: slots routed to each expert;
  - ``offsets`` ``[E + 1]``: ``offsets[e]:offsets[e + 1]`` are expert ``e``'s positions in the sorted
    order; ``offsets[E]`` is the number of routed (non-skipped) slots;
  - ``sorted_slots`` ``[N * k]``: the slot at each sorted position (a full permutation; positions
    ``>= offsets[E]`` hold the skipped slots in ascending order);
  - ``slot_positions`` ``[N * k]``: its inverse, the sorted position of each slot.

  All four are ``int64``. Within an expert, slots keep their original order (stable), which is what
  makes every implementation produce bit-identical metadata.
* Weights: ``w_gate_up`` ``[E, 2F, H]`` holds ``[gate; up]`` (Megatron's ``linear_fc1`` layout),
  ``w_down`` ``[E, H, F]``; the expert is ``down(silu(gate x) * up x)``.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

SUPPORTED_ACTIVATIONS = ("swiglu",)


class RoutingMetadata(NamedTuple):
    tokens_per_expert: torch.Tensor  # [E] int64
    sorted_slots: torch.Tensor  # [N*k] int64, the permutation (sorted position -> slot)
    slot_positions: torch.Tensor  # [N*k] int64, its inverse (slot -> sorted position)
    offsets: torch.Tensor  # [E+1] int64, group boundaries in sorted order


def valid_slot_mask(expert_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """True where a slot is routed to a local expert (ids in ``[0, num_experts)``)."""
    return (expert_ids >= 0) & (expert_ids < num_experts)


def check_expert_inputs(hidden, expert_ids, weights, w_gate_up, w_down, activation="swiglu"):
    """Shape/dtype checks shared by the reference and the kernels (one clear ValueError)."""
    if activation not in SUPPORTED_ACTIVATIONS:
        raise ValueError(f"activation {activation!r} is not supported (choose from {SUPPORTED_ACTIVATIONS})")
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be [N, H], got shape {tuple(hidden.shape)}")
    n, h = hidden.shape
    if expert_ids.dim() != 2 or expert_ids.shape[0] != n:
        raise ValueError(f"expert_ids must be [N={n}, k], got shape {tuple(expert_ids.shape)}")
    if expert_ids.dtype.is_floating_point or expert_ids.dtype == torch.bool:
        raise ValueError(f"expert_ids must be an integer tensor, got {expert_ids.dtype}")
    if weights.shape != expert_ids.shape:
        raise ValueError(f"weights must have the shape of expert_ids {tuple(expert_ids.shape)}, "
                         f"got {tuple(weights.shape)}")
    if w_gate_up.dim() != 3 or w_gate_up.shape[2] != h or w_gate_up.shape[1] % 2:
        raise ValueError(f"w_gate_up must be [E, 2F, H={h}], got shape {tuple(w_gate_up.shape)}")
    e, two_f, _ = w_gate_up.shape
    if tuple(w_down.shape) != (e, h, two_f // 2):
        raise ValueError(f"w_down must be [E={e}, H={h}, F={two_f // 2}], got shape {tuple(w_down.shape)}")


def routing_metadata_reference(expert_ids: torch.Tensor, num_experts: int) -> RoutingMetadata:
    """Stable sort of the ``N * k`` slots by expert (see the module docstring for the convention)."""
    if num_experts < 1:
        raise ValueError(f"num_experts must be >= 1, got {num_experts}")
    flat = expert_ids.reshape(-1).long()
    keys = torch.where(valid_slot_mask(flat, num_experts), flat, torch.full_like(flat, num_experts))
    sorted_slots = torch.sort(keys, stable=True).indices
    slot_positions = torch.empty_like(sorted_slots)
    slot_positions[sorted_slots] = torch.arange(flat.numel(), device=flat.device)
    tokens_per_expert = torch.bincount(keys, minlength=num_experts + 1)[:num_experts]
    offsets = torch.zeros(num_experts + 1, dtype=torch.long, device=flat.device)
    offsets[1:] = torch.cumsum(tokens_per_expert, 0)
    return RoutingMetadata(tokens_per_expert, sorted_slots, slot_positions, offsets)


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for ``gate_up = [gate | up]`` along the last dimension."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def grouped_expert_ffn_reference(
    hidden: torch.Tensor,
    expert_ids: torch.Tensor,
    weights: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    activation: str = "swiglu",
) -> torch.Tensor:
    """``out[n] = sum_j weights[n, j] * expert_{ids[n, j]}(hidden[n])``, skipped slots excluded.

    hidden ``[N, H]``, expert_ids ``[N, k]`` (local ids; -1 = skip), weights ``[N, k]``,
    w_gate_up ``[E, 2F, H]``, w_down ``[E, H, F]`` -> ``[N, H]`` in ``hidden.dtype``. The weighted sum
    over the k choices is accumulated in fp32 (fp64 for fp64 inputs). Loop over experts; differentiable
    in hidden, weights and both weight tensors.
    """
    check_expert_inputs(hidden, expert_ids, weights, w_gate_up, w_down, activation)
    n, h = hidden.shape
    k = expert_ids.shape[1]
    num_experts = w_gate_up.shape[0]
    acc_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    out = hidden.new_zeros((n, h), dtype=acc_dtype)
    flat_ids = expert_ids.reshape(-1)
    flat_w = weights.reshape(-1)
    for e in range(num_experts):
        slots = torch.nonzero(flat_ids == e, as_tuple=True)[0]
        if slots.numel() == 0:
            continue
        tokens = slots // k
        x = hidden.index_select(0, tokens)
        y = swiglu(x @ w_gate_up[e].t()) @ w_down[e].t()
        out = out.index_add(0, tokens, y.to(acc_dtype) * flat_w.index_select(0, slots).to(acc_dtype)[:, None])
    return out.to(hidden.dtype)


def topk_routing(router_logits: torch.Tensor, top_k: int, normalize_topk: bool = True):
    """Softmax over experts in fp32, top-k, optional renormalisation of the k weights to sum to 1.

    Returns ``(weights [T, k] fp32 (fp64 for fp64 logits), expert_ids [T, k] int64)``.
    """
    if router_logits.dim() != 2:
        raise ValueError(f"router_logits must be [T, E], got shape {tuple(router_logits.shape)}")
    if not 1 <= top_k <= router_logits.shape[1]:
        raise ValueError(f"top_k must be in [1, {router_logits.shape[1]}], got {top_k}")
    dtype = torch.float64 if router_logits.dtype == torch.float64 else torch.float32
    probs = torch.softmax(router_logits.to(dtype), dim=-1)
    weights, expert_ids = torch.topk(probs, top_k, dim=-1)
    if normalize_topk:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, expert_ids


def moe_ffn_reference(
    hidden: torch.Tensor,
    router_logits: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    top_k: int,
    normalize_topk: bool = True,
) -> torch.Tensor:
    """The whole MoE FFN in plain torch: ``topk_routing`` then ``grouped_expert_ffn_reference``.

    hidden ``[T, H]``, router_logits ``[T, E]`` -> ``[T, H]``; differentiable in all tensor inputs.
    """
    if router_logits.shape[0] != hidden.shape[0] or router_logits.shape[1] != w_gate_up.shape[0]:
        raise ValueError(f"router_logits must be [T={hidden.shape[0]}, E={w_gate_up.shape[0]}], "
                         f"got shape {tuple(router_logits.shape)}")
    weights, expert_ids = topk_routing(router_logits, top_k, normalize_topk)
    return grouped_expert_ffn_reference(hidden, expert_ids, weights, w_gate_up, w_down)


def row_errors(got: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    """Per-row error of a low-precision result: each row's (last dimension's) max ``|got - want|``
    over the row's scale, its max ``|want|`` floored at the median scale of the non-zero rows (rows
    that are nearly zero are not judged against their own tiny magnitude). One value per row, fp32. A relative
    Frobenius error over the whole tensor hides a few corrupted rows; the worst row does not."""
    if got.shape != want.shape:
        raise ValueError(f"shapes differ: {tuple(got.shape)} vs {tuple(want.shape)}")
    if got.numel() == 0:
        return torch.zeros(0)
    width = got.shape[-1] if got.dim() else 1
    a, b = got.detach().float().reshape(-1, width), want.detach().float().reshape(-1, width)
    scale = b.abs().amax(dim=1)
    nonzero = scale[scale > 0]
    floor = nonzero.median() if nonzero.numel() else torch.tensor(torch.finfo(torch.float32).tiny)
    return ((a - b).abs().amax(dim=1) / torch.maximum(scale, floor)).nan_to_num(float("inf"))
