"""Triton grouped-GEMM expert FFN (SwiGLU experts): the kernels, their launch wrappers, the autograd
Function :class:`GroupedExpertFFN` and the plain-torch reference :func:`grouped_expert_ffn_reference`.

Weights: ``w_gate_up [E, 2F, H]`` (``[gate; up]``), ``w_down [E, H, F]``. Routing: ``expert_ids [N, k]``
(local ids, -1 = skip) and ``weights [N, k]``; slots ``s = n*k + j`` are stable-sorted by expert by the
routing op (``routing.py``, which documents the slot conventions), giving each expert a contiguous
group of sorted positions ``offsets[e]:offsets[e+1]``. The expert is ``down(silu(gate x) * up x)``.

Forward (``i`` = sorted position, ``s = sorted_slots[i]``, ``n = s // k``, ``e`` = its expert):
  1. ``_gate_up_swiglu_kernel``: ``gu[i] = x[n] @ w_gate_up[e]^T`` with the token rows *gathered
     while loading* (no permuted copy of x); gate and up columns interleaved in one B tile, so one
     dot reads the A tile once; SwiGLU and the routing weight in the epilogue: stores the
     pre-activation ``gu [S, 2F]`` (for backward) and ``wact = weights[s] * silu(gate) * up [S, F]``.
  2. ``_rows_gemm_scatter_kernel``: ``y[s] = wact[i] @ w_down[e]^T``, scattered back to slot order.
  3. ``combine_slots`` (``moe_combine.py``): ``out[n] = sum_j y[n*k+j]`` over routed slots (fp32,
     deterministic).
Backward (``dout [N, H]``):
  4. ``_down_bwd_swiglu_kernel``: ``g[i] = dout[n] @ w_down[e]`` (gathered rows); epilogue: grad of the
     routing weight ``<g[i], act[i]>`` (per column tile, summed after), ``dact = weights[s] * g``, and
     the SwiGLU backward from the stored ``gu`` -> ``dgu [S, 2F]``.
  5. ``_rows_gemm_scatter_kernel``: ``dx_slot[s] = dgu[i] @ w_gate_up[e]``, scattered to slot order;
     ``combine_slots`` sums the k slots of each token.
  6. ``_expert_wgrad_kernel`` (grouped over each expert's row group, optionally split along it):
     ``dw_down[e] = sum_i dout[n]^T wact[i]`` (``wact`` recomputed from ``gu`` when
     ``recompute_activation``) and ``dw_gate_up[e] = sum_i dgu[i]^T x[n]`` (gathered rows). Both
     operands are plain loads, so the loop pipelines (the routing weight already sits in ``wact``).
The row-tile GEMMs (steps 1, 2, 4, 5) share one K loop, ``_dot_k_loop``.
Tiles: the row-tile -> (expert, first row) map is computed inside each program from ``offsets`` (a
vectorised search, on the device, no host synchronisation); the grid is the upper bound
``cdiv(S, BLOCK_M) + E`` row tiles and tiles past the last expert exit at once. Grouped-M swizzling
keeps weight tiles hot in L2. Deterministic: no atomics; a split weight gradient is summed in a fixed
order. Under ``TRITON_INTERPRET=1`` (set before the first import) the kernels run on CPU with small
tiles; test them in fp32/fp16, not bf16.
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from .moe_combine import combine_slots
from .routing import routing_metadata
from .triton_aot import INTERPRET, launch


def _autotune_enabled() -> bool:
    return os.environ.get("JAI_MOE_AUTOTUNE", "1") != "0"


def _configs(gpu_configs, interpret_tile=(16, 16, 16)):
    """Autotune configs: H100 bf16 tiles on GPU (only the first with ``JAI_MOE_AUTOTUNE=0``); one small
    tile under the interpreter (``JAI_MOE_INTERPRET_TILE=M,N,K`` overrides it)."""
    if INTERPRET:
        tile = os.environ.get("JAI_MOE_INTERPRET_TILE", ",".join(map(str, interpret_tile)))
        bm, bn, bk = (int(v) for v in tile.split(","))
        return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 2})]
    configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8}, num_warps=w,
                             num_stages=s) for m, n, k, w, s in gpu_configs]
    return configs if _autotune_enabled() else configs[:1]


# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages), best guess first; `tools/compile_kernels.py
# --all-configs` lists registers, spills and shared memory of each (docs/kernels.md). The gate/up kernel's dot is
# 2*BLOCK_N wide (gate and up columns interleaved); the down-backward kernel has a heavy SwiGLU
# epilogue and stays at 64 columns.
GATE_UP_CONFIGS = _configs([(128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 64, 64, 8, 4),
                            (64, 128, 64, 4, 4)])
ROWS_CONFIGS = _configs([(128, 256, 64, 8, 3), (128, 128, 64, 8, 4), (256, 128, 64, 8, 3),
                         (128, 128, 64, 4, 4), (64, 128, 64, 4, 4)])
DOWN_BWD_CONFIGS = _configs([(128, 64, 64, 8, 4), (128, 64, 64, 8, 3), (128, 64, 32, 8, 5)])
# The weight-gradient loop loads the gather indices one stage ahead of the operands, so its operand
# buffers number num_stages - 2 (at most 3): deep pipelines.
WGRAD_CONFIGS = _configs([(128, 128, 64, 8, 5), (128, 128, 64, 8, 4), (128, 256, 64, 8, 4),
                          (128, 128, 32, 8, 7), (64, 128, 64, 4, 6)])


def _even(**dims):
    """Heuristics ``EVEN_K`` / ``EVEN_M`` / ``EVEN_N``: the named size is a multiple of its block, so
    loads along it need neither masks nor clamping (which would hide their contiguity from the
    compiler and cost vectorised, asynchronous copies)."""
    return {f"EVEN_{axis}": (lambda size: lambda args: args[size] % args[f"BLOCK_{axis}"] == 0)(size)
            for axis, size in dims.items()}


def _block_e(num_experts: int) -> int:
    """Lanes of the vectorised expert search (a power of two >= the experts)."""
    return max(16, triton.next_power_of_2(num_experts))


@triton.jit
def _swizzle(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """Grouped ordering: GROUP_M row tiles share each column sweep, so weight tiles stay in L2."""
    pids_in_group = GROUP_M * num_pid_n
    group = pid // pids_in_group
    first_m = group * GROUP_M
    group_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % pids_in_group) % group_m
    pid_n = (pid % pids_in_group) // group_m
    return pid_m, pid_n


@triton.jit
def _expert_row_tile(tile, offsets_ptr, num_experts, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
    """(expert, first sorted row, end of the expert's rows) of row tile ``tile``; expert -1 past the
    last tile. Experts own ``cdiv(count, BLOCK_M)`` consecutive tiles (none when empty). One vector
    load of the offsets and a prefix sum: the owner is the number of experts whose tiles all lie
    before ``tile``."""
    lanes = tl.arange(0, BLOCK_E)
    live = lanes < num_experts
    starts = tl.load(offsets_ptr + lanes, mask=live, other=0).to(tl.int32)
    ends = tl.load(offsets_ptr + lanes + 1, mask=live, other=0).to(tl.int32)
    n_tiles = (ends - starts + BLOCK_M - 1) // BLOCK_M
    tiles_end = tl.cumsum(n_tiles, axis=0)  # lanes past the experts repeat the total
    expert = tl.sum((tiles_end <= tile).to(tl.int32), axis=0)
    owner = lanes == expert
    first_tile = tl.sum(tl.where(owner, tiles_end - n_tiles, 0), axis=0)
    row_start = tl.sum(tl.where(owner, starts, 0), axis=0) + (tile - first_tile) * BLOCK_M
    row_end = tl.sum(tl.where(owner, ends, 0), axis=0)
    return tl.where(expert < num_experts, expert, -1), row_start, row_end


@triton.jit
def _dot_k_loop(acc, a_ptrs, b_ptrs, stride_ak, stride_bk, K, INPUT_PRECISION: tl.constexpr,
                EVEN_K: tl.constexpr, BLOCK_K: tl.constexpr):
    """``acc + A @ B`` over ``K`` in steps of ``BLOCK_K``: ``a_ptrs`` ``[BLOCK_M, BLOCK_K]`` and ``b_ptrs``
    ``[BLOCK_K, BLOCK_N]`` point at the first step and advance by ``BLOCK_K * stride`` along K. The
    K tail is masked unless ``EVEN_K``."""
    ks = tl.arange(0, BLOCK_K)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            k_mask = ks < K - k0
            a = tl.load(a_ptrs, mask=k_mask[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=k_mask[:, None], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    return acc


# Main loops load without masks where they can: out-of-range rows/columns are clamped to the last valid
# one (their results are masked at the store), K is unmasked when it is a multiple of BLOCK_K (EVEN_K).

@triton.autotune(configs=GATE_UP_CONFIGS, key=["H", "F", "num_experts"])
@triton.heuristics(_even(K="H"))
@triton.jit
def _gate_up_swiglu_kernel(
    x_ptr, w_ptr, sorted_slots_ptr, offsets_ptr, routing_weights_ptr, gu_ptr, wact_ptr,
    num_slots, num_experts, top_k, H, F,
    stride_xn, stride_xh, stride_we, stride_wf, stride_wh, stride_gu, stride_wact,
    INPUT_PRECISION: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_E: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """``gu[i] = x[token(i)] @ w_gate_up[e]^T`` (both halves), ``wact[i] = weight * silu(gate) * up``."""
    num_row_tiles = tl.cdiv(num_slots, BLOCK_M) + num_experts
    pid_m, pid_n = _swizzle(tl.program_id(0), num_row_tiles, tl.cdiv(F, BLOCK_N), GROUP_M)
    expert, row_start, row_end = _expert_row_tile(pid_m, offsets_ptr, num_experts, BLOCK_M, BLOCK_E)
    if expert < 0:
        return
    rows = row_start + tl.arange(0, BLOCK_M)
    row_mask = rows < row_end
    slots = tl.load(sorted_slots_ptr + tl.minimum(rows, row_end - 1))
    tokens = (slots // top_k).to(tl.int64)
    # B tile column j holds weight row (j // 2) of the gate (j even) or up (j odd) half.
    j = tl.arange(0, 2 * BLOCK_N)
    w_rows = tl.minimum(pid_n * BLOCK_N + j // 2, F - 1) + (j % 2) * F
    ks = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + tokens[:, None] * stride_xn + ks[None, :] * stride_xh
    w_ptrs = w_ptr + expert.to(tl.int64) * stride_we + w_rows[None, :].to(tl.int64) * stride_wf \
        + ks[:, None] * stride_wh
    acc = tl.zeros((BLOCK_M, 2 * BLOCK_N), dtype=tl.float32)
    acc = _dot_k_loop(acc, x_ptrs, w_ptrs, stride_xh, stride_wh, H, INPUT_PRECISION, EVEN_K, BLOCK_K)
    gate, up = tl.split(tl.reshape(acc, (BLOCK_M, BLOCK_N, 2)))
    out_dtype = gu_ptr.dtype.element_ty
    gate = gate.to(out_dtype)
    up = up.to(out_dtype)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = row_mask[:, None] & (cols < F)[None, :]
    gu_ptrs = gu_ptr + rows[:, None].to(tl.int64) * stride_gu + cols[None, :]
    tl.store(gu_ptrs, gate, mask=mask)
    tl.store(gu_ptrs + F, up, mask=mask)
    # From the rounded pre-activation, in the order _expert_wgrad_kernel recomputes it (bit-identical).
    gate32 = gate.to(tl.float32)
    scale = tl.load(routing_weights_ptr + slots).to(tl.float32)
    wact = gate32 * tl.sigmoid(gate32) * up.to(tl.float32) * scale[:, None]
    tl.store(wact_ptr + rows[:, None].to(tl.int64) * stride_wact + cols[None, :], wact.to(out_dtype), mask=mask)


@triton.autotune(configs=ROWS_CONFIGS, key=["N", "K", "num_experts"])
@triton.heuristics(_even(K="K", N="N"))
@triton.jit
def _rows_gemm_scatter_kernel(
    a_ptr, w_ptr, sorted_slots_ptr, offsets_ptr, out_ptr,
    num_slots, num_experts, N, K,
    stride_a, stride_ak, stride_we, stride_wn, stride_wk, stride_out,
    INPUT_PRECISION: tl.constexpr, EVEN_K: tl.constexpr, EVEN_N: tl.constexpr, BLOCK_E: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """``out[sorted_slots[i], n] = sum_k a[i, k] * W[e, n, k]`` (W through strides)."""
    num_row_tiles = tl.cdiv(num_slots, BLOCK_M) + num_experts
    pid_m, pid_n = _swizzle(tl.program_id(0), num_row_tiles, tl.cdiv(N, BLOCK_N), GROUP_M)
    expert, row_start, row_end = _expert_row_tile(pid_m, offsets_ptr, num_experts, BLOCK_M, BLOCK_E)
    if expert < 0:
        return
    rows = row_start + tl.arange(0, BLOCK_M)
    row_mask = rows < row_end
    rows_ld = tl.minimum(rows, row_end - 1).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    if EVEN_N:
        cols_ld = cols.to(tl.int64)
    else:
        cols_ld = tl.minimum(cols, N - 1).to(tl.int64)
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rows_ld[:, None] * stride_a + ks[None, :] * stride_ak
    w_ptrs = w_ptr + expert.to(tl.int64) * stride_we + cols_ld[None, :] * stride_wn + ks[:, None] * stride_wk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = _dot_k_loop(acc, a_ptrs, w_ptrs, stride_ak, stride_wk, K, INPUT_PRECISION, EVEN_K, BLOCK_K)
    slots = tl.load(sorted_slots_ptr + rows_ld)
    out_ptrs = out_ptr + slots[:, None].to(tl.int64) * stride_out + cols[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


@triton.autotune(configs=DOWN_BWD_CONFIGS, key=["H", "F", "num_experts"], reset_to_zero=["dweight_part_ptr"])
@triton.heuristics(_even(K="H", N="F"))
@triton.jit
def _down_bwd_swiglu_kernel(
    dout_ptr, w_ptr, gu_ptr, sorted_slots_ptr, offsets_ptr, routing_weights_ptr, dgu_ptr, dweight_part_ptr,
    num_slots, num_experts, top_k, H, F,
    stride_dout, stride_douth, stride_we, stride_wh, stride_wf, stride_gu, stride_dgu, stride_part,
    INPUT_PRECISION: tl.constexpr, EVEN_K: tl.constexpr, EVEN_N: tl.constexpr, BLOCK_E: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """``g[i] = dout[token(i)] @ w_down[e]``; epilogue: the routing-weight grad partial ``<g, act>`` over
    this column tile, then the SwiGLU backward of ``dact = weight * g`` into ``dgu = [dgate | dup]``."""
    num_row_tiles = tl.cdiv(num_slots, BLOCK_M) + num_experts
    pid_m, pid_n = _swizzle(tl.program_id(0), num_row_tiles, tl.cdiv(F, BLOCK_N), GROUP_M)
    expert, row_start, row_end = _expert_row_tile(pid_m, offsets_ptr, num_experts, BLOCK_M, BLOCK_E)
    if expert < 0:
        return
    rows = row_start + tl.arange(0, BLOCK_M)
    row_mask = rows < row_end
    slots = tl.load(sorted_slots_ptr + tl.minimum(rows, row_end - 1))
    tokens = (slots // top_k).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < F
    if EVEN_N:
        cols_ld = cols
    else:
        cols_ld = tl.minimum(cols, F - 1)
    ks = tl.arange(0, BLOCK_K)
    d_ptrs = dout_ptr + tokens[:, None] * stride_dout + ks[None, :] * stride_douth
    w_ptrs = w_ptr + expert.to(tl.int64) * stride_we + ks[:, None].to(tl.int64) * stride_wh \
        + cols_ld[None, :] * stride_wf
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = _dot_k_loop(acc, d_ptrs, w_ptrs, stride_douth, stride_wh, H, INPUT_PRECISION, EVEN_K, BLOCK_K)
    # Everything that depends on gu only first (one layout), then one meeting with the accumulator:
    # the compiler converts the accumulator once instead of bouncing each temporary between layouts.
    mask = row_mask[:, None] & col_mask[None, :]
    gu_ptrs = gu_ptr + rows[:, None].to(tl.int64) * stride_gu + cols[None, :]
    gate = tl.load(gu_ptrs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gu_ptrs + F, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(gate)
    silu = gate * sig
    act = (silu * up).to(gu_ptr.dtype.element_ty).to(tl.float32)  # the expert output, rounded as stored
    scale = tl.load(routing_weights_ptr + slots).to(tl.float32)[:, None]
    dgate_coef = scale * up * sig * (1.0 + gate * (1.0 - sig))
    dup_coef = scale * silu
    part = tl.sum(tl.where(mask, acc * act, 0.0), axis=1)
    tl.store(dweight_part_ptr + rows.to(tl.int64) * stride_part + pid_n, part, mask=row_mask)
    dgu_ptrs = dgu_ptr + rows[:, None].to(tl.int64) * stride_dgu + cols[None, :]
    out_dtype = dgu_ptr.dtype.element_ty
    tl.store(dgu_ptrs, (acc * dgate_coef).to(out_dtype), mask=mask)
    tl.store(dgu_ptrs + F, (acc * dup_coef).to(out_dtype), mask=mask)


@triton.autotune(configs=WGRAD_CONFIGS, key=["M", "N", "num_experts", "num_splits", "LHS_GATHER", "RHS_MODE"])
@triton.heuristics(_even(M="M", N="N"))
@triton.jit
def _expert_wgrad_kernel(
    lhs_ptr, rhs_ptr, sorted_slots_ptr, offsets_ptr, routing_weights_ptr, out_ptr,
    num_experts, num_splits, top_k, M, N, F,
    stride_lhs, stride_lhsm, stride_rhs, stride_rhsn, stride_os, stride_oe, stride_om, stride_on,
    LHS_GATHER: tl.constexpr, RHS_MODE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    EVEN_M: tl.constexpr, EVEN_N: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """``out[split, e] = sum over rows i of expert e's split-th chunk of L[i]^T R[i]`` -> ``[M, N]``.

    L rows: ``LHS_GATHER`` -> ``lhs[token(i)]`` (dout), else ``lhs[i]`` (dgu).
    R rows: RHS_MODE 0 -> ``rhs[i]`` (wact), 1 -> ``weight * silu(gate) * up`` recomputed from
    ``rhs = gu [S, 2F]``, 2 -> ``rhs[token(i)]`` (x). Rows past the chunk are clamped on the R side and
    zeroed on the L side. Empty experts and empty chunks store zeros.
    """
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pid = tl.program_id(0)
    split = tl.program_id(1)
    expert = pid // (num_pid_m * num_pid_n)
    pid_m, pid_n = _swizzle(pid % (num_pid_m * num_pid_n), num_pid_m, num_pid_n, GROUP_M)
    group_start = tl.load(offsets_ptr + expert).to(tl.int32)
    group_end = tl.load(offsets_ptr + expert + 1).to(tl.int32)
    chunk = tl.cdiv(tl.cdiv(group_end - group_start, num_splits), BLOCK_K) * BLOCK_K
    row_start = group_start + split * chunk
    row_end = tl.minimum(row_start + chunk, group_end)
    ms = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    ns = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if EVEN_M:
        ms_ld = ms
    else:
        ms_ld = tl.minimum(ms, M - 1)
    if EVEN_N:
        ns_ld = ns
    else:
        ns_ld = tl.minimum(ns, N - 1)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(row_start, row_end, BLOCK_K):
        rows = r0 + tl.arange(0, BLOCK_K)
        r_mask = rows < row_end
        rows_ld = tl.minimum(rows, row_end - 1)
        if LHS_GATHER or RHS_MODE == 2:
            slots = tl.load(sorted_slots_ptr + rows_ld)
            tokens = (slots // top_k).to(tl.int64)
        if LHS_GATHER:
            l_rows = tokens
        else:
            l_rows = rows_ld.to(tl.int64)
        lt = tl.load(lhs_ptr + l_rows[None, :] * stride_lhs + ms_ld[:, None] * stride_lhsm,
                     mask=r_mask[None, :], other=0.0)
        if RHS_MODE == 0:
            r = tl.load(rhs_ptr + rows_ld[:, None].to(tl.int64) * stride_rhs + ns_ld[None, :] * stride_rhsn)
        elif RHS_MODE == 1:
            gu_ptrs = rhs_ptr + rows_ld[:, None].to(tl.int64) * stride_rhs + ns_ld[None, :] * stride_rhsn
            gate = tl.load(gu_ptrs).to(tl.float32)
            up = tl.load(gu_ptrs + F * stride_rhsn).to(tl.float32)
            scale = tl.load(routing_weights_ptr + tl.load(sorted_slots_ptr + rows_ld)).to(tl.float32)
            r = (gate * tl.sigmoid(gate) * up * scale[:, None]).to(lt.dtype)  # as _gate_up_swiglu_kernel
        else:
            r = tl.load(rhs_ptr + tokens[:, None] * stride_rhs + ns_ld[None, :] * stride_rhsn)
        acc = tl.dot(lt, r, acc, input_precision=INPUT_PRECISION)
    out_ptrs = out_ptr + split.to(tl.int64) * stride_os + expert.to(tl.int64) * stride_oe \
        + ms[:, None].to(tl.int64) * stride_om + ns[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=(ms < M)[:, None] & (ns < N)[None, :])


# ---- launch wrappers -----------------------------------------------------------------------------

def _input_precision(dtype: torch.dtype) -> str:
    # fp32 GEMMs follow torch's TF32 switch; 16-bit inputs ignore it.
    if dtype == torch.float32 and not INTERPRET and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def _row_tile_grid(num_slots: int, num_experts: int, num_cols: int):
    """Upper bound on the row tiles (each expert adds at most one partial tile) x column tiles;
    the kernels recompute the same bound from ``num_slots`` for their swizzle."""
    return lambda meta: ((triton.cdiv(num_slots, meta["BLOCK_M"]) + num_experts)
                         * triton.cdiv(num_cols, meta["BLOCK_N"]),)


def gate_up_swiglu_forward(x, w_gate_up, sorted_slots, offsets, routing_weights, top_k):
    """-> (gu [S, 2F] pre-activation, wact [S, F] = routing weight * silu(gate) * up), sorted order."""
    num_experts, two_f, h = w_gate_up.shape
    f = two_f // 2
    num_slots = sorted_slots.numel()
    gu = torch.empty((num_slots, two_f), dtype=x.dtype, device=x.device)
    wact = torch.empty((num_slots, f), dtype=x.dtype, device=x.device)
    if num_slots == 0 or f == 0:
        return gu, wact
    launch(_gate_up_swiglu_kernel, _row_tile_grid(num_slots, num_experts, f),
           x, w_gate_up, sorted_slots, offsets, routing_weights, gu, wact,
           num_slots, num_experts, top_k, h, f,
           x.stride(0), x.stride(1), w_gate_up.stride(0), w_gate_up.stride(1), w_gate_up.stride(2),
           gu.stride(0), wact.stride(0),
           INPUT_PRECISION=_input_precision(x.dtype), BLOCK_E=_block_e(num_experts))
    return gu, wact


def rows_gemm_scatter(a, w, w_n_stride, w_k_stride, num_cols, sorted_slots, offsets):
    """``out[sorted_slots[i]] = a[i] @ W[e]`` with ``W[e][k, n]`` at ``w[e] + n * w_n_stride +
    k * w_k_stride`` -> ``[S, num_cols]`` in slot order (rows of skipped slots are left unwritten: the
    combine ignores them)."""
    num_experts = w.shape[0]
    num_slots, depth = a.shape
    out = torch.empty((num_slots, num_cols), dtype=a.dtype, device=a.device)
    if num_slots == 0 or num_cols == 0:
        return out
    launch(_rows_gemm_scatter_kernel, _row_tile_grid(num_slots, num_experts, num_cols),
           a, w, sorted_slots, offsets, out,
           num_slots, num_experts, num_cols, depth,
           a.stride(0), a.stride(1), w.stride(0), w_n_stride, w_k_stride, out.stride(0),
           INPUT_PRECISION=_input_precision(a.dtype), BLOCK_E=_block_e(num_experts))
    return out


def down_backward_swiglu(dout, w_down, gu, sorted_slots, offsets, routing_weights, top_k):
    """-> (dgu [S, 2F] sorted order, grad of the routing weight per sorted row [S] fp32)."""
    num_experts, h, f = w_down.shape
    num_slots = sorted_slots.numel()
    dgu = torch.empty_like(gu)
    if num_slots == 0 or f == 0:
        return dgu, torch.zeros(num_slots, dtype=torch.float32, device=dout.device)
    # Per column tile partial sums (deterministic), summed below; sized for the smallest BLOCK_N.
    min_block_n = min(c.kwargs["BLOCK_N"] for c in DOWN_BWD_CONFIGS)
    parts = torch.zeros((num_slots, triton.cdiv(f, min_block_n)), dtype=torch.float32, device=dout.device)
    launch(_down_bwd_swiglu_kernel, _row_tile_grid(num_slots, num_experts, f),
           dout, w_down, gu, sorted_slots, offsets, routing_weights, dgu, parts,
           num_slots, num_experts, top_k, h, f,
           dout.stride(0), dout.stride(1), w_down.stride(0), w_down.stride(1), w_down.stride(2), gu.stride(0),
           dgu.stride(0), parts.stride(0),
           INPUT_PRECISION=_input_precision(dout.dtype), BLOCK_E=_block_e(num_experts))
    return dgu, parts.sum(dim=1)


@functools.lru_cache(maxsize=None)
def _multiprocessors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


WGRAD_SPLIT_MIN_ROWS = 1024  # rows per expert and split, at least
WGRAD_SPLIT_MAX_BYTES = 1 << 30  # fp32 partial sums of a split weight gradient, at most


def wgrad_splits(num_experts: int, m: int, n: int, num_slots: int, device: torch.device) -> int:
    """Chunks each expert's rows are split into for its weight gradient (split-K). ``1`` unless the
    ``E x tiles`` grid fills under two waves of the GPU and the experts have rows to spare; from the
    shapes and the GPU model only, never from the routing, so it is reproducible. The environment
    variable ``JAI_MOE_WGRAD_SPLIT_K`` overrides it (``1`` = off)."""
    forced = os.environ.get("JAI_MOE_WGRAD_SPLIT_K")
    if forced:
        if not forced.isdigit() or int(forced) < 1:
            raise ValueError(f"JAI_MOE_WGRAD_SPLIT_K must be a positive integer, got {forced!r}")
        return int(forced)
    if device.type != "cuda" or num_experts == 0:
        return 1
    tiles = num_experts * triton.cdiv(m, 128) * triton.cdiv(n, 128)
    sms = _multiprocessors(device.index if device.index is not None else torch.cuda.current_device())
    splits = min(8, (2 * sms) // max(tiles, 1), num_slots // (num_experts * WGRAD_SPLIT_MIN_ROWS))
    while splits > 1 and splits * num_experts * m * n * 4 > WGRAD_SPLIT_MAX_BYTES:
        splits -= 1
    return max(splits, 1)


def expert_wgrad(lhs, rhs, sorted_slots, offsets, routing_weights, top_k, num_experts, m, n, out_dtype,
                 lhs_gather, rhs_mode, f=0, splits=None):
    """``[E, m, n]``: per expert, the sum over its rows of ``L[i]^T R[i]`` (see the kernel). Split-K
    (``splits``, default :func:`wgrad_splits`) writes fp32 partial sums that are added in split order."""
    out = torch.empty((num_experts, m, n), dtype=out_dtype, device=lhs.device)
    if m == 0 or n == 0:
        return out
    splits = splits or wgrad_splits(num_experts, m, n, sorted_slots.numel(), lhs.device)
    target = out if splits == 1 else torch.empty((splits, num_experts, m, n), dtype=torch.float32,
                                                 device=lhs.device)

    def grid(meta):
        return (num_experts * triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]), splits)

    launch(_expert_wgrad_kernel, grid,
           lhs, rhs, sorted_slots, offsets, routing_weights if routing_weights is not None else lhs, target,
           num_experts, splits, top_k, m, n, f,
           lhs.stride(0), lhs.stride(1), rhs.stride(0), rhs.stride(1),
           target.stride(0) if splits > 1 else 0, target.stride(-3), target.stride(-2), target.stride(-1),
           LHS_GATHER=lhs_gather, RHS_MODE=rhs_mode, INPUT_PRECISION=_input_precision(lhs.dtype))
    if splits > 1:
        total = target[0].clone()
        for part in target[1:]:  # a fixed order: bit-reproducible
            total += part
        out.copy_(total)
    return out


# ---- autograd ------------------------------------------------------------------------------------

class GroupedExpertFFN(torch.autograd.Function):
    """Triton SwiGLU expert FFN; see the module docstring for the kernels it runs."""

    @staticmethod
    def forward(ctx, hidden, expert_ids, weights, w_gate_up, w_down, recompute_activation):
        num_experts, two_f, h = w_gate_up.shape
        top_k = expert_ids.shape[1]
        hidden = hidden.contiguous()
        expert_ids = expert_ids.contiguous()
        flat_weights = weights.contiguous().reshape(-1)
        w_gate_up = w_gate_up.contiguous()
        w_down = w_down.contiguous()
        meta = routing_metadata(expert_ids, num_experts)
        gu, wact = gate_up_swiglu_forward(hidden, w_gate_up, meta.sorted_slots, meta.offsets, flat_weights,
                                          top_k)
        y = rows_gemm_scatter(wact, w_down, w_down.stride(1), w_down.stride(2), h, meta.sorted_slots,
                              meta.offsets)
        out = combine_slots(y, expert_ids, num_experts, hidden.dtype)
        ctx.top_k = top_k
        ctx.weights_dtype = weights.dtype
        saved_wact = None if recompute_activation else wact
        ctx.save_for_backward(hidden, expert_ids, flat_weights, w_gate_up, w_down, meta.sorted_slots,
                              meta.slot_positions, meta.offsets, gu, saved_wact)
        return out

    @staticmethod
    def backward(ctx, dout):
        (hidden, expert_ids, flat_weights, w_gate_up, w_down, sorted_slots, slot_positions, offsets, gu,
         wact) = ctx.saved_tensors
        num_experts, two_f, h = w_gate_up.shape
        f = two_f // 2
        top_k = ctx.top_k
        need_x, _, need_rw, need_wgu, need_wd, _ = ctx.needs_input_grad
        dout = dout.contiguous()
        if dout.dtype != hidden.dtype:
            dout = dout.to(hidden.dtype)
        d_hidden = d_weights = d_w_gate_up = d_w_down = None
        if need_wd:
            rhs, mode = (gu, 1) if wact is None else (wact, 0)
            d_w_down = expert_wgrad(dout, rhs, sorted_slots, offsets, flat_weights, top_k, num_experts, h, f,
                                    w_down.dtype, lhs_gather=True, rhs_mode=mode, f=f)
        if need_x or need_rw or need_wgu:
            dgu, d_weight_sorted = down_backward_swiglu(dout, w_down, gu, sorted_slots, offsets, flat_weights,
                                                        top_k)
            if need_rw:
                routed = slot_positions < offsets[-1]
                per_slot = d_weight_sorted[slot_positions.clamp(max=max(d_weight_sorted.numel() - 1, 0))]
                d_weights = torch.where(routed, per_slot, torch.zeros_like(per_slot))
                d_weights = d_weights.reshape(expert_ids.shape).to(ctx.weights_dtype)
            if need_x:
                dx_slots = rows_gemm_scatter(dgu, w_gate_up, w_gate_up.stride(2), w_gate_up.stride(1), h,
                                             sorted_slots, offsets)
                d_hidden = combine_slots(dx_slots, expert_ids, num_experts, hidden.dtype)
            if need_wgu:
                d_w_gate_up = expert_wgrad(dgu, hidden, sorted_slots, offsets, None, top_k, num_experts, two_f, h,
                                           w_gate_up.dtype, lhs_gather=False, rhs_mode=2)
        return d_hidden, None, d_weights, d_w_gate_up, d_w_down, None


def grouped_expert_ffn_triton(hidden, expert_ids, weights, w_gate_up, w_down, recompute_activation=False):
    """:class:`GroupedExpertFFN` (argument checks: :func:`check_expert_inputs`, done by the caller)."""
    if not (hidden.dtype == w_gate_up.dtype == w_down.dtype):
        raise ValueError(f"hidden, w_gate_up and w_down must share a dtype, got {hidden.dtype}, "
                         f"{w_gate_up.dtype}, {w_down.dtype}")
    return GroupedExpertFFN.apply(hidden, expert_ids, weights, w_gate_up, w_down, bool(recompute_activation))


# ---- plain-torch reference -----------------------------------------------------------------------

SUPPORTED_ACTIVATIONS = ("swiglu",)


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


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for ``gate_up = [gate | up]`` along the last dimension."""
    gate, up = gate_up.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


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
