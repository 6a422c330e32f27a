"""Triton grouped-GEMM expert FFN (SwiGLU experts), forward and backward, as one autograd Function.

Weights: ``w_gate_up [E, 2F, H]`` (``[gate; up]``), ``w_down [E, H, F]``. Routing: ``expert_ids [N, k]``
(local ids, -1 = skip) and ``weights [N, k]``; slots ``s = n*k + j`` are stable-sorted by expert by the
routing op (``megatron_jai.kernels.routing``), giving each expert a contiguous group of sorted
positions ``offsets[e]:offsets[e+1]``. Conventions: ``megatron_jai/moe/reference.py``.

Forward (``i`` = sorted position, ``s = sorted_slots[i]``, ``n = s // k``, ``e`` = its expert):
  1. ``_gate_up_swiglu_kernel``: ``gu[i] = x[n] @ w_gate_up[e]^T`` with the token rows *gathered
     while loading* (no permuted copy of x), both halves in one program, SwiGLU in the epilogue:
     stores the pre-activation ``gu [S, 2F]`` (for backward) and ``act = silu(gate) * up [S, F]``.
  2. ``_rows_gemm_scatter_kernel``: ``y[s] = weights[s] * act[i] @ w_down[e]^T``; the epilogue applies
     the routing weight and scatters the row back to slot order ``y [S, H]``.
  3. ``combine_slots``: ``out[n] = sum_j y[n*k+j]`` over routed slots (fp32, deterministic).
Backward (``dout [N, H]``):
  4. ``_down_bwd_swiglu_kernel``: ``g[i] = dout[n] @ w_down[e]`` (gathered rows); epilogue: grad of the
     routing weight ``<g[i], act[i]>`` (per column tile, summed after), ``dact = weights[s] * g``, and
     the SwiGLU backward from the stored ``gu`` -> ``dgu [S, 2F]``.
  5. ``_rows_gemm_scatter_kernel``: ``dx_slot[s] = dgu[i] @ w_gate_up[e]``, scattered to slot order;
     ``combine_slots`` sums the k slots of each token.
  6. ``_expert_wgrad_kernel`` (grouped over each expert's row group):
     ``dw_down[e] = sum_i (weights[s] dout[n])^T act[i]`` (act recomputed from ``gu`` when
     ``recompute_activation``) and ``dw_gate_up[e] = sum_i dgu[i]^T x[n]`` (gathered rows).
Tiles: the row-tile -> (expert, first row) map is computed inside each program from ``offsets`` (on
the device, no host synchronisation); the grid is the upper bound ``cdiv(S, BLOCK_M) + E`` row tiles
and tiles past the last expert exit at once. Grouped-M swizzling keeps weight tiles hot in L2.
Everything is deterministic (no atomics). Under ``TRITON_INTERPRET=1`` (set before the first import)
the kernels run on CPU with small tiles; test them in fp32/fp16, not bf16.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from megatron_jai.kernels.moe_combine import combine_slots
from megatron_jai.kernels.routing import routing_metadata

INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


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


# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages), best guess first. The gate/up kernel keeps two
# BLOCK_N wide accumulators (an effective 2*BLOCK_N tile); the down-backward kernel has a heavy SwiGLU
# epilogue, so both prefer narrower N tiles (wider ones spill registers on sm_90).
GATE_UP_CONFIGS = _configs([(128, 64, 64, 8, 4), (128, 64, 64, 8, 3), (64, 64, 64, 4, 4),
                            (128, 64, 32, 4, 4)])
ROWS_CONFIGS = _configs([(128, 256, 64, 8, 3), (128, 128, 64, 8, 4), (256, 128, 64, 8, 3),
                         (128, 128, 64, 4, 4), (64, 128, 64, 4, 4)])
DOWN_BWD_CONFIGS = _configs([(128, 64, 64, 8, 4), (128, 64, 64, 8, 3), (128, 32, 64, 4, 4)])
WGRAD_CONFIGS = _configs([(128, 128, 64, 8, 4), (128, 128, 64, 8, 3), (128, 256, 64, 8, 3),
                          (128, 128, 32, 8, 4), (64, 128, 64, 4, 4)])


def _even(**dims):
    """Heuristics ``EVEN_K`` / ``EVEN_M`` / ``EVEN_N``: the named size is a multiple of its block, so
    loads along it need neither masks nor clamping (which would hide their contiguity from the
    compiler and cost vectorised, asynchronous copies)."""
    return {f"EVEN_{axis}": (lambda size: lambda args: args[size] % args[f"BLOCK_{axis}"] == 0)(size)
            for axis, size in dims.items()}


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
def _expert_row_tile(tile, offsets_ptr, num_experts, BLOCK_M: tl.constexpr):
    """(expert, first sorted row, end of the expert's rows) of row tile ``tile``; expert -1 past the
    last tile. Experts own ``cdiv(count, BLOCK_M)`` consecutive tiles (none when empty)."""
    expert = -1
    row_start = 0
    row_end = 0
    tiles_before = 0
    for e in range(0, num_experts):
        start = tl.load(offsets_ptr + e).to(tl.int32)
        end = tl.load(offsets_ptr + e + 1).to(tl.int32)
        n_tiles = tl.cdiv(end - start, BLOCK_M)
        hit = (tile >= tiles_before) & (tile < tiles_before + n_tiles)
        expert = tl.where(hit, e, expert)
        row_start = tl.where(hit, start + (tile - tiles_before) * BLOCK_M, row_start)
        row_end = tl.where(hit, end, row_end)
        tiles_before += n_tiles
    return expert, row_start, row_end


# Main loops load without masks where they can: out-of-range rows/columns are clamped to the last valid
# one (their results are masked at the store), K is unmasked when it is a multiple of BLOCK_K (EVEN_K).

@triton.autotune(configs=GATE_UP_CONFIGS, key=["H", "F", "num_experts"])
@triton.heuristics(_even(K="H"))
@triton.jit
def _gate_up_swiglu_kernel(
    x_ptr, w_ptr, sorted_slots_ptr, offsets_ptr, gu_ptr, act_ptr,
    num_slots, num_experts, top_k, H, F,
    stride_xn, stride_we, stride_wf, stride_wh, stride_gu, stride_act,
    INPUT_PRECISION: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """``gu[i] = x[token(i)] @ w_gate_up[e]^T`` (both halves), ``act[i] = silu(gate) * up``."""
    num_row_tiles = tl.cdiv(num_slots, BLOCK_M) + num_experts
    pid_m, pid_n = _swizzle(tl.program_id(0), num_row_tiles, tl.cdiv(F, BLOCK_N), GROUP_M)
    expert, row_start, row_end = _expert_row_tile(pid_m, offsets_ptr, num_experts, BLOCK_M)
    if expert < 0:
        return
    rows = row_start + tl.arange(0, BLOCK_M)
    row_mask = rows < row_end
    slots = tl.load(sorted_slots_ptr + tl.minimum(rows, row_end - 1))
    tokens = (slots // top_k).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < F
    cols_ld = tl.minimum(cols, F - 1).to(tl.int64)
    ks = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + tokens[:, None] * stride_xn + ks[None, :]
    wg_ptrs = w_ptr + expert.to(tl.int64) * stride_we + cols_ld[None, :] * stride_wf + ks[:, None] * stride_wh
    wu_ptrs = wg_ptrs + F * stride_wf
    acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        if EVEN_K:
            x = tl.load(x_ptrs)
            wg = tl.load(wg_ptrs)
            wu = tl.load(wu_ptrs)
        else:
            k_mask = ks < H - k0
            x = tl.load(x_ptrs, mask=k_mask[None, :], other=0.0)
            wg = tl.load(wg_ptrs, mask=k_mask[:, None], other=0.0)
            wu = tl.load(wu_ptrs, mask=k_mask[:, None], other=0.0)
        acc_gate = tl.dot(x, wg, acc_gate, input_precision=INPUT_PRECISION)
        acc_up = tl.dot(x, wu, acc_up, input_precision=INPUT_PRECISION)
        x_ptrs += BLOCK_K
        wg_ptrs += BLOCK_K * stride_wh
        wu_ptrs += BLOCK_K * stride_wh
    out_dtype = gu_ptr.dtype.element_ty
    gate = acc_gate.to(out_dtype)
    up = acc_up.to(out_dtype)
    mask = row_mask[:, None] & col_mask[None, :]
    gu_ptrs = gu_ptr + rows[:, None].to(tl.int64) * stride_gu + cols[None, :]
    tl.store(gu_ptrs, gate, mask=mask)
    tl.store(gu_ptrs + F, up, mask=mask)
    # From the rounded pre-activation, so a backward recompute reproduces it bit for bit.
    gate32 = gate.to(tl.float32)
    act = gate32 * tl.sigmoid(gate32) * up.to(tl.float32)
    tl.store(act_ptr + rows[:, None].to(tl.int64) * stride_act + cols[None, :], act.to(out_dtype), mask=mask)


@triton.autotune(configs=ROWS_CONFIGS, key=["N", "K", "num_experts", "APPLY_WEIGHT"])
@triton.heuristics(_even(K="K", N="N"))
@triton.jit
def _rows_gemm_scatter_kernel(
    a_ptr, w_ptr, sorted_slots_ptr, offsets_ptr, routing_weights_ptr, out_ptr,
    num_slots, num_experts, N, K,
    stride_a, stride_we, stride_wn, stride_wk, stride_out,
    APPLY_WEIGHT: tl.constexpr, INPUT_PRECISION: tl.constexpr, EVEN_K: tl.constexpr, EVEN_N: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """``out[sorted_slots[i], n] = (routing_weight *) sum_k a[i, k] * W[e, n, k]`` (W through strides)."""
    num_row_tiles = tl.cdiv(num_slots, BLOCK_M) + num_experts
    pid_m, pid_n = _swizzle(tl.program_id(0), num_row_tiles, tl.cdiv(N, BLOCK_N), GROUP_M)
    expert, row_start, row_end = _expert_row_tile(pid_m, offsets_ptr, num_experts, BLOCK_M)
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
    a_ptrs = a_ptr + rows_ld[:, None] * stride_a + ks[None, :]
    w_ptrs = w_ptr + expert.to(tl.int64) * stride_we + cols_ld[None, :] * stride_wn + ks[:, None] * stride_wk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs)
            w = tl.load(w_ptrs)
        else:
            k_mask = ks < K - k0
            a = tl.load(a_ptrs, mask=k_mask[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=k_mask[:, None], other=0.0)
        acc = tl.dot(a, w, acc, input_precision=INPUT_PRECISION)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K * stride_wk
    slots = tl.load(sorted_slots_ptr + rows_ld)
    if APPLY_WEIGHT:
        acc = acc * tl.load(routing_weights_ptr + slots).to(tl.float32)[:, None]
    out_ptrs = out_ptr + slots[:, None].to(tl.int64) * stride_out + cols[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


@triton.autotune(configs=DOWN_BWD_CONFIGS, key=["H", "F", "num_experts"], reset_to_zero=["dweight_part_ptr"])
@triton.heuristics(_even(K="H", N="F"))
@triton.jit
def _down_bwd_swiglu_kernel(
    dout_ptr, w_ptr, gu_ptr, sorted_slots_ptr, offsets_ptr, routing_weights_ptr, dgu_ptr, dweight_part_ptr,
    num_slots, num_experts, top_k, H, F,
    stride_dout, stride_we, stride_wh, stride_wf, stride_gu, stride_dgu, stride_part,
    INPUT_PRECISION: tl.constexpr, EVEN_K: tl.constexpr, EVEN_N: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """``g[i] = dout[token(i)] @ w_down[e]``; epilogue: the routing-weight grad partial ``<g, act>`` over
    this column tile, then the SwiGLU backward of ``dact = weight * g`` into ``dgu = [dgate | dup]``."""
    num_row_tiles = tl.cdiv(num_slots, BLOCK_M) + num_experts
    pid_m, pid_n = _swizzle(tl.program_id(0), num_row_tiles, tl.cdiv(F, BLOCK_N), GROUP_M)
    expert, row_start, row_end = _expert_row_tile(pid_m, offsets_ptr, num_experts, BLOCK_M)
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
    d_ptrs = dout_ptr + tokens[:, None] * stride_dout + ks[None, :]
    w_ptrs = w_ptr + expert.to(tl.int64) * stride_we + ks[:, None].to(tl.int64) * stride_wh \
        + cols_ld[None, :] * stride_wf
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        if EVEN_K:
            d = tl.load(d_ptrs)
            w = tl.load(w_ptrs)
        else:
            k_mask = ks < H - k0
            d = tl.load(d_ptrs, mask=k_mask[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=k_mask[:, None], other=0.0)
        acc = tl.dot(d, w, acc, input_precision=INPUT_PRECISION)
        d_ptrs += BLOCK_K
        w_ptrs += BLOCK_K * stride_wh
    mask = row_mask[:, None] & col_mask[None, :]
    gu_ptrs = gu_ptr + rows[:, None].to(tl.int64) * stride_gu + cols[None, :]
    gate = tl.load(gu_ptrs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gu_ptrs + F, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(gate)
    silu = gate * sig
    act = (silu * up).to(gu_ptr.dtype.element_ty).to(tl.float32)  # as rounded in the forward
    part = tl.sum(tl.where(mask, acc * act, 0.0), axis=1)
    tl.store(dweight_part_ptr + rows.to(tl.int64) * stride_part + pid_n, part, mask=row_mask)
    dact = acc * tl.load(routing_weights_ptr + slots).to(tl.float32)[:, None]
    dgate = dact * up * sig * (1.0 + gate * (1.0 - sig))
    dup = dact * silu
    dgu_ptrs = dgu_ptr + rows[:, None].to(tl.int64) * stride_dgu + cols[None, :]
    out_dtype = dgu_ptr.dtype.element_ty
    tl.store(dgu_ptrs, dgate.to(out_dtype), mask=mask)
    tl.store(dgu_ptrs + F, dup.to(out_dtype), mask=mask)


@triton.autotune(configs=WGRAD_CONFIGS, key=["M", "N", "num_experts", "LHS_GATHER", "RHS_MODE"])
@triton.heuristics(_even(M="M", N="N"))
@triton.jit
def _expert_wgrad_kernel(
    lhs_ptr, rhs_ptr, sorted_slots_ptr, offsets_ptr, routing_weights_ptr, out_ptr,
    num_experts, top_k, M, N, F,
    stride_lhs, stride_rhs, stride_oe, stride_om, stride_on,
    LHS_GATHER: tl.constexpr, RHS_MODE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    EVEN_M: tl.constexpr, EVEN_N: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """``out[e] = sum over expert e's sorted rows i of L[i]^T R[i]`` -> ``[M, N]`` per expert.

    L rows: ``LHS_GATHER`` -> ``routing_weight[s] * lhs[token(i)]`` (dout), else ``lhs[i]`` (dgu).
    R rows: RHS_MODE 0 -> ``rhs[i]`` (act), 1 -> ``silu(gate) * up`` recomputed from ``rhs = gu [S, 2F]``,
    2 -> ``rhs[token(i)]`` (x). Rows past the group are clamped on the R side and zeroed on the L side.
    Experts without rows get zeros.
    """
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pid = tl.program_id(0)
    expert = pid // (num_pid_m * num_pid_n)
    pid_m, pid_n = _swizzle(pid % (num_pid_m * num_pid_n), num_pid_m, num_pid_n, GROUP_M)
    row_start = tl.load(offsets_ptr + expert).to(tl.int32)
    row_end = tl.load(offsets_ptr + expert + 1).to(tl.int32)
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
    in_dtype = lhs_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(row_start, row_end, BLOCK_K):
        rows = r0 + tl.arange(0, BLOCK_K)
        r_mask = rows < row_end
        rows_ld = tl.minimum(rows, row_end - 1)
        if LHS_GATHER or RHS_MODE == 2:
            slots = tl.load(sorted_slots_ptr + rows_ld)
            tokens = (slots // top_k).to(tl.int64)
        if LHS_GATHER:
            # The routing weight is zeroed past the group, which zeroes those rows' contribution.
            scale = tl.load(routing_weights_ptr + slots, mask=r_mask, other=0.0).to(tl.float32)
            lt = tl.load(lhs_ptr + tokens[None, :] * stride_lhs + ms_ld[:, None])
            lt = (lt.to(tl.float32) * scale[None, :]).to(in_dtype)
        else:
            lt = tl.load(lhs_ptr + rows_ld[None, :].to(tl.int64) * stride_lhs + ms_ld[:, None],
                         mask=r_mask[None, :], other=0.0)
        if RHS_MODE == 0:
            r = tl.load(rhs_ptr + rows_ld[:, None].to(tl.int64) * stride_rhs + ns_ld[None, :])
        elif RHS_MODE == 1:
            gu_ptrs = rhs_ptr + rows_ld[:, None].to(tl.int64) * stride_rhs + ns_ld[None, :]
            gate = tl.load(gu_ptrs).to(tl.float32)
            up = tl.load(gu_ptrs + F).to(tl.float32)
            r = (gate * tl.sigmoid(gate) * up).to(in_dtype)
        else:
            r = tl.load(rhs_ptr + tokens[:, None] * stride_rhs + ns_ld[None, :])
        acc = tl.dot(lt, r, acc, input_precision=INPUT_PRECISION)
    out_ptrs = out_ptr + expert.to(tl.int64) * stride_oe + ms[:, None].to(tl.int64) * stride_om \
        + ns[None, :] * stride_on
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


def gate_up_swiglu_forward(x, w_gate_up, sorted_slots, offsets, top_k):
    """-> (gu [S, 2F] pre-activation, act [S, F] = silu(gate) * up), rows in sorted order."""
    num_experts, two_f, h = w_gate_up.shape
    f = two_f // 2
    num_slots = sorted_slots.numel()
    gu = torch.empty((num_slots, two_f), dtype=x.dtype, device=x.device)
    act = torch.empty((num_slots, f), dtype=x.dtype, device=x.device)
    if num_slots == 0 or f == 0:
        return gu, act
    _gate_up_swiglu_kernel[_row_tile_grid(num_slots, num_experts, f)](
        x, w_gate_up, sorted_slots, offsets, gu, act,
        num_slots, num_experts, top_k, h, f,
        x.stride(0), w_gate_up.stride(0), w_gate_up.stride(1), w_gate_up.stride(2), gu.stride(0),
        act.stride(0),
        INPUT_PRECISION=_input_precision(x.dtype))
    return gu, act


def rows_gemm_scatter(a, w, w_n_stride, w_k_stride, num_cols, sorted_slots, offsets, routing_weights=None):
    """``out[sorted_slots[i]] = (routing_weights[slot] *) a[i] @ W[e]`` with ``W[e][k, n]`` at
    ``w[e] + n * w_n_stride + k * w_k_stride`` -> ``[S, num_cols]`` in slot order (rows of skipped
    slots are left unwritten: the combine ignores them)."""
    num_experts = w.shape[0]
    num_slots, depth = a.shape
    out = torch.empty((num_slots, num_cols), dtype=a.dtype, device=a.device)
    if num_slots == 0 or num_cols == 0:
        return out
    apply_weight = routing_weights is not None
    _rows_gemm_scatter_kernel[_row_tile_grid(num_slots, num_experts, num_cols)](
        a, w, sorted_slots, offsets, routing_weights if apply_weight else a, out,
        num_slots, num_experts, num_cols, depth,
        a.stride(0), w.stride(0), w_n_stride, w_k_stride, out.stride(0),
        APPLY_WEIGHT=apply_weight, INPUT_PRECISION=_input_precision(a.dtype))
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
    _down_bwd_swiglu_kernel[_row_tile_grid(num_slots, num_experts, f)](
        dout, w_down, gu, sorted_slots, offsets, routing_weights, dgu, parts,
        num_slots, num_experts, top_k, h, f,
        dout.stride(0), w_down.stride(0), w_down.stride(1), w_down.stride(2), gu.stride(0), dgu.stride(0),
        parts.stride(0), INPUT_PRECISION=_input_precision(dout.dtype))
    return dgu, parts.sum(dim=1)


def expert_wgrad(lhs, rhs, sorted_slots, offsets, routing_weights, top_k, num_experts, m, n, out_dtype,
                 lhs_gather, rhs_mode, f=0):
    """``[E, m, n]``: per expert, the sum over its rows of ``L[i]^T R[i]`` (see the kernel)."""
    out = torch.empty((num_experts, m, n), dtype=out_dtype, device=lhs.device)
    if m == 0 or n == 0:
        return out

    def grid(meta):
        return (num_experts * triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

    _expert_wgrad_kernel[grid](
        lhs, rhs, sorted_slots, offsets, routing_weights if routing_weights is not None else lhs, out,
        num_experts, top_k, m, n, f,
        lhs.stride(0), rhs.stride(0), out.stride(0), out.stride(1), out.stride(2),
        LHS_GATHER=lhs_gather, RHS_MODE=rhs_mode, INPUT_PRECISION=_input_precision(lhs.dtype))
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
        gu, act = gate_up_swiglu_forward(hidden, w_gate_up, meta.sorted_slots, meta.offsets, top_k)
        y = rows_gemm_scatter(act, w_down, w_down.stride(1), w_down.stride(2), h, meta.sorted_slots,
                              meta.offsets, routing_weights=flat_weights)
        out = combine_slots(y, expert_ids, num_experts, hidden.dtype)
        ctx.recompute_activation = recompute_activation
        ctx.top_k = top_k
        ctx.weights_dtype = weights.dtype
        saved_act = None if recompute_activation else act
        ctx.save_for_backward(hidden, expert_ids, flat_weights, w_gate_up, w_down, meta.sorted_slots,
                              meta.slot_positions, meta.offsets, gu, saved_act)
        return out

    @staticmethod
    def backward(ctx, dout):
        (hidden, expert_ids, flat_weights, w_gate_up, w_down, sorted_slots, slot_positions, offsets, gu,
         act) = ctx.saved_tensors
        num_experts, two_f, h = w_gate_up.shape
        f = two_f // 2
        top_k = ctx.top_k
        need_x, _, need_rw, need_wgu, need_wd, _ = ctx.needs_input_grad
        dout = dout.contiguous()
        if dout.dtype != hidden.dtype:
            dout = dout.to(hidden.dtype)
        d_hidden = d_weights = d_w_gate_up = d_w_down = None
        if need_wd:
            rhs, mode = (gu, 1) if act is None else (act, 0)
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
    """Triton path of :func:`megatron_jai.moe.functional.grouped_expert_ffn` (no argument checks here)."""
    if not (hidden.dtype == w_gate_up.dtype == w_down.dtype):
        raise ValueError(f"hidden, w_gate_up and w_down must share a dtype, got {hidden.dtype}, "
                         f"{w_gate_up.dtype}, {w_down.dtype}")
    return GroupedExpertFFN.apply(hidden, expert_ids, weights, w_gate_up, w_down, bool(recompute_activation))


# ---- ahead-of-time compilation check (no GPU needed) ---------------------------------------------

_KERNEL_VARIANTS = (  # (autotuned kernel, constexpr arguments that select a variant)
    ("_gate_up_swiglu_kernel", {}),
    ("_rows_gemm_scatter_kernel", {"APPLY_WEIGHT": True}),
    ("_rows_gemm_scatter_kernel", {"APPLY_WEIGHT": False}),
    ("_down_bwd_swiglu_kernel", {}),
    ("_expert_wgrad_kernel", {"LHS_GATHER": True, "RHS_MODE": 0}),
    ("_expert_wgrad_kernel", {"LHS_GATHER": True, "RHS_MODE": 1}),
    ("_expert_wgrad_kernel", {"LHS_GATHER": False, "RHS_MODE": 2}),
)
_INDEX_ARGS = ("sorted_slots_ptr", "offsets_ptr")
_FP32_ARGS = ("routing_weights_ptr", "dweight_part_ptr")
_UNALIGNED_INT_ARGS = ("num_slots", "num_experts", "top_k")


def compile_check(capability: int = 90, dtype: str = "bf16", all_configs: bool = False):
    """Compile every kernel variant for ``sm_<capability>`` without a GPU (Triton + ptxas only), as the
    autotuner would for 16-aligned shapes. Returns one dict per compiled kernel (name, variant, config,
    shared memory, count of Hopper wgmma instructions). Raises on a compile error. Needs the kernels
    imported *without* ``TRITON_INTERPRET``."""
    if INTERPRET:
        raise RuntimeError("compile_check needs the kernels imported without TRITON_INTERPRET=1")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    results = []
    for name, variant in _KERNEL_VARIANTS:
        autotuned = globals()[name]
        jit_fn = autotuned
        while not isinstance(jit_fn, triton.runtime.JITFunction):
            jit_fn = jit_fn.fn
        for config in (autotuned.configs if all_configs else autotuned.configs[:1]):
            constexprs = dict(config.kwargs, INPUT_PRECISION="ieee", **variant)
            constexprs.update({arg: True for arg in jit_fn.arg_names if arg.startswith("EVEN_")})
            signature, attrs = {}, {}
            for i, arg in enumerate(jit_fn.arg_names):
                if arg in constexprs:
                    signature[arg] = "constexpr"
                    continue
                if arg.endswith("_ptr"):
                    signature[arg] = ("*i64" if arg in _INDEX_ARGS else "*fp32" if arg in _FP32_ARGS
                                      else f"*{dtype}")
                else:
                    signature[arg] = "i32"
                if arg not in _UNALIGNED_INT_ARGS:
                    attrs[(i,)] = [["tt.divisibility", 16]]
            source = ASTSource(fn=jit_fn, signature=signature, constexprs=constexprs, attrs=attrs)
            compiled = triton.compile(source, target=GPUTarget("cuda", capability, 64 if capability < 100 else 32),
                                      options={"num_warps": config.num_warps, "num_stages": config.num_stages})
            results.append({"kernel": name, "variant": variant, "config": dict(config.kwargs),
                            "num_warps": config.num_warps, "num_stages": config.num_stages,
                            "shared_bytes": compiled.metadata.shared,
                            "wgmma": compiled.asm["ptx"].count("wgmma.mma_async"),
                            "cubin": compiled.asm["cubin"]})
    from megatron_jai.kernels import moe_combine

    combine = moe_combine._combine_slots_kernel
    signature = {arg: ("*i64" if arg == "expert_ids_ptr" else f"*{dtype}") if arg.endswith("_ptr") else "i32"
                 for arg in combine.arg_names}
    signature["BLOCK_COLS"] = "constexpr"
    compiled = triton.compile(ASTSource(fn=combine, signature=signature,
                                        constexprs={"BLOCK_COLS": moe_combine.BLOCK_COLS}),
                              target=GPUTarget("cuda", capability, 64 if capability < 100 else 32))
    results.append({"kernel": "_combine_slots_kernel", "variant": {},
                    "config": {"BLOCK_COLS": moe_combine.BLOCK_COLS},
                    "num_warps": compiled.metadata.num_warps, "num_stages": compiled.metadata.num_stages,
                    "shared_bytes": compiled.metadata.shared, "wgmma": 0, "cubin": compiled.asm["cubin"]})
    return results
