"""Plain-torch references at the model level: :func:`topk_routing` (the router's fp32 softmax and
top-k) and :func:`moe_ffn_reference` (the whole MoE FFN from router logits: top-k, then the expert
computation), plus :func:`row_errors`, the row-wise yardstick of low-precision results.

The kernels' own references live beside them in ``megatron_jai.kernels`` (routing metadata and its
conventions: ``routing``; the grouped expert FFN: ``moe_grouped_gemm``; the slot combine:
``moe_combine``); this module holds what no kernel computes.
"""
from __future__ import annotations

import torch


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
    # Imported on use: the first import of the kernels fixes Triton's interpreter mode.
    from megatron_jai.kernels.moe_grouped_gemm import grouped_expert_ffn_reference

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
