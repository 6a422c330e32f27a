"""Deterministic combine of per-slot rows into per-token rows: ``out[n] = sum_j rows[n*k + j]`` over the
routed slots of token n (skipped slots, expert id outside ``[0, E)``, are ignored even if their rows
hold garbage). Accumulates in fp32, writes ``out_dtype``. Used by the expert FFN forward (sum of the k
weighted expert outputs) and backward (sum of the k input gradients); no atomics, so bit-reproducible.
A step inside ``GroupedExpertFFN``'s forward and backward, so no autograd Function of its own.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .routing import valid_slot_mask
from .triton_aot import INTERPRET, launch

# Columns per program: wide on GPU (bandwidth bound), tiny under the interpreter.
BLOCK_COLS = 64 if INTERPRET else 1024


@triton.jit
def _combine_slots_kernel(
    rows_ptr, expert_ids_ptr, out_ptr,
    num_cols, top_k, num_experts,
    stride_rows, stride_out,
    BLOCK_COLS: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    col_mask = cols < num_cols
    acc = tl.zeros((BLOCK_COLS,), dtype=tl.float32)
    for j in range(0, top_k):
        slot = token * top_k + j
        # The expert id broadcast over the columns (a vector mask; rows of skipped slots are garbage).
        expert = tl.load(expert_ids_ptr + slot + tl.zeros_like(cols))
        routed = col_mask & (expert >= 0) & (expert < num_experts)
        row = tl.load(rows_ptr + slot * stride_rows + cols, mask=routed, other=0.0)
        acc += row.to(tl.float32)
    tl.store(out_ptr + token * stride_out + cols, acc.to(out_ptr.dtype.element_ty), mask=col_mask)


def combine_slots(rows: torch.Tensor, expert_ids: torch.Tensor, num_experts: int,
                  out_dtype: torch.dtype) -> torch.Tensor:
    """rows ``[N*k, C]`` (slot order), expert_ids ``[N, k]`` -> ``[N, C]`` in ``out_dtype``."""
    n, top_k = expert_ids.shape
    num_cols = rows.shape[1]
    out = torch.empty((n, num_cols), dtype=out_dtype, device=rows.device)
    if n == 0 or num_cols == 0:
        return out
    assert rows.stride(1) == 1 and rows.shape[0] == n * top_k
    grid = (n, triton.cdiv(num_cols, BLOCK_COLS))
    launch(_combine_slots_kernel, grid, rows, expert_ids.contiguous(), out, num_cols, top_k, num_experts,
           rows.stride(0), out.stride(0), BLOCK_COLS=BLOCK_COLS)
    return out


# ---- plain-torch reference -----------------------------------------------------------------------

def combine_slots_reference(rows: torch.Tensor, expert_ids: torch.Tensor, num_experts: int,
                            out_dtype: torch.dtype) -> torch.Tensor:
    """:func:`combine_slots` in plain torch (the fp32 sum may be ordered differently: close, not bitwise)."""
    n, top_k = expert_ids.shape
    routed = valid_slot_mask(expert_ids.reshape(-1, 1), num_experts)
    kept = torch.where(routed, rows.float(), torch.zeros((), device=rows.device))
    return kept.reshape(n, top_k, rows.shape[1]).sum(dim=1).to(out_dtype)
