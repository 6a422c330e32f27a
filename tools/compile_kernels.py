#!/usr/bin/env python
"""Compile the Triton MoE kernels ahead of time for a GPU architecture, without a GPU, and audit them.

    python tools/compile_kernels.py                       # sm_90, the JAI-75B layer, first configurations
    python tools/compile_kernels.py --all-configs         # every autotune configuration
    python tools/compile_kernels.py --shapes mixtral,1024x2048x1408x64x6 --capability 90

The launch wrappers of one forward and backward of each shape run on ``meta`` tensors; their launches are
recorded and compiled (Triton + ptxas) exactly as the launcher would specialise them (unit strides as
constants, heuristics, autotune configurations: kernels/triton_aot.py). One row per compiled
kernel: tile, warps, stages, shared memory, Hopper wgmma instructions, and registers, stack and local
(spill) bytes per thread from cuobjdump. Exit 1 when a kernel fails to compile, uses a stack or spills,
or (sm_90) a GEMM kernel has no wgmma. Run it with TRITON_INTERPRET unset.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

TOOLS = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(TOOLS), TOOLS]

from bench_moe import SHAPES, parse_shapes  # noqa: E402  (one list of benchmark shapes)
from megatron_jai import cli  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}  # the training dtypes (tensor cores)
VARIANT_KEYS = ("LHS_GATHER", "RHS_MODE")  # constexprs that make another kernel, not another tile


def record_launches(shape, dtype):
    """Every kernel launch of one forward + backward of ``shape`` (a bench_moe ``Shape``), recorded
    from the launch wrappers run on ``meta`` tensors: ``[(kernel, args, kwargs)]``."""
    from megatron_jai.kernels import triton_aot
    from megatron_jai.kernels.moe_combine import combine_slots
    from megatron_jai.kernels.moe_grouped_gemm import (
        down_backward_swiglu,
        expert_wgrad,
        gate_up_swiglu_forward,
        rows_gemm_scatter,
    )

    t, h, f, e, k = shape.tokens, shape.hidden, shape.ffn, shape.experts, shape.top_k
    s = t * k

    def empty(*size, dt=dtype):
        return torch.empty(*size, dtype=dt, device="meta")

    x, dout = empty(t, h), empty(t, h)
    w_gate_up, w_down = empty(e, 2 * f, h), empty(e, h, f)
    slots, offsets, weights = empty(s, dt=torch.int64), empty(e + 1, dt=torch.int64), empty(s, dt=torch.float32)
    with triton_aot.recording() as launches:
        gu, wact = gate_up_swiglu_forward(x, w_gate_up, slots, offsets, weights, k)
        y = rows_gemm_scatter(wact, w_down, w_down.stride(1), w_down.stride(2), h, slots, offsets)
        combine_slots(y, empty(t, k, dt=torch.int64), e, dtype)
        dgu, _ = down_backward_swiglu(dout, w_down, gu, slots, offsets, weights, k)
        rows_gemm_scatter(dgu, w_gate_up, w_gate_up.stride(2), w_gate_up.stride(1), h, slots, offsets)
        for rhs, mode in ((wact, 0), (gu, 1)):
            expert_wgrad(dout, rhs, slots, offsets, weights, k, e, h, f, dtype, lhs_gather=True, rhs_mode=mode, f=f)
        for splits in (1, 2):  # split-K writes fp32 partial sums: another specialisation
            expert_wgrad(dgu, x, slots, offsets, None, k, e, 2 * f, h, dtype, lhs_gather=False, rhs_mode=2,
                         splits=splits)
    return launches


def compile_check(capability: int = 90, dtype: torch.dtype = torch.bfloat16, all_configs: bool = False,
                  shape=SHAPES["jai75b"], progress: bool = False):
    """Compile every launch of :func:`record_launches` for ``sm_<capability>``. Returns one dict per
    compile: kernel, variant, config, num_warps, num_stages, shared_bytes, wgmma (count of Hopper
    ``wgmma.mma_async``), reg / stack / local (bytes per thread; absent without cuobjdump), or
    ``error`` (the first line of the compiler's message)."""
    from megatron_jai.kernels import triton_aot

    if triton_aot.INTERPRET:
        raise cli.UserError("the kernels were imported in Triton's interpreter: unset TRITON_INTERPRET")
    launches = record_launches(shape, dtype)
    total = sum(len(getattr(kernel, "configs", [None])) if all_configs else 1 for kernel, _, _ in launches)
    results = []
    with cli.progress(total=total, desc=f"compile sm_{capability} {shape.name}", unit="kernel",
                      enabled=progress) as bar:
        for kernel, args, kwargs in launches:
            name = triton_aot._jit_function(kernel).__name__
            variant = {k: v for k, v in kwargs.items() if k in VARIANT_KEYS}
            if name == "_expert_wgrad_kernel":
                variant["splits"] = args[7]
            row = {"kernel": name, "variant": variant}
            try:
                for kw, compiled in triton_aot.compile_recorded(kernel, args, kwargs, capability, all_configs):
                    results.append({
                        **row, "config": {k: v for k, v in kw.items() if k.startswith(("BLOCK_", "EVEN_"))},
                        "num_warps": compiled.metadata.num_warps, "num_stages": compiled.metadata.num_stages,
                        "shared_bytes": compiled.metadata.shared,
                        "wgmma": compiled.asm["ptx"].count("wgmma.mma_async"),
                        **triton_aot.resource_usage(compiled.asm["cubin"])})
                    bar.update(1)
            except Exception as err:  # a kernel that does not compile is a failed check, reported by problems()
                results.append({**row, "config": {}, "error": (str(err).strip() or type(err).__name__).splitlines()[0]})
    return results


def problems(rows, capability: int):
    """What the audit rejects, one line each: compile errors, stacks and spills, GEMMs without wgmma on sm_90."""
    found = []
    for r in rows:
        label = f"{r['kernel']} {_variant(r)} {_tile(r)}".replace("  ", " ")
        if "error" in r:
            found.append(f"{label}: does not compile: {r['error']}")
            continue
        if r.get("stack") or r.get("local"):
            found.append(f"{label}: {r.get('stack', 0)} stack / {r.get('local', 0)} local bytes per thread")
        if capability == 90 and r["kernel"] != "_combine_slots_kernel" and not r["wgmma"]:
            found.append(f"{label}: no wgmma instruction")
    return found


def _variant(r):
    return ", ".join(f"{k}={v}" for k, v in r["variant"].items())


def _tile(r):
    c = r["config"]
    if "BLOCK_COLS" in c:
        return f"{c['BLOCK_COLS']} cols"
    if "BLOCK_M" not in c:
        return "-"
    return f"{c['BLOCK_M']}x{c['BLOCK_N']}x{c['BLOCK_K']}"


def print_table(rows):
    header = (f"{'kernel':<27} {'variant':<38} {'tile':>11} {'warps':>5} {'stages':>6} {'smem KiB':>8} "
              f"{'wgmma':>5} {'regs':>4} {'stack/local':>11}")
    print(header)
    print("-" * len(header))
    for r in rows:
        if "error" in r:
            print(f"{r['kernel']:<27} {_variant(r):<38} compile error: {r['error']}")
            continue
        spills = f"{r['stack']}/{r['local']}" if "stack" in r else "-"
        print(f"{r['kernel']:<27} {_variant(r):<38} {_tile(r):>11} {r['num_warps']:>5} {r['num_stages']:>6} "
              f"{r['shared_bytes'] / 1024:>8.0f} {r['wgmma']:>5} {r.get('reg', '-'):>4} {spills:>11}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=cli.HelpFormatter)
    p.add_argument("--capability", type=int, default=90, help="compute capability to compile for (90 = H100/H200)")
    p.add_argument("--shapes", default="jai75b",
                   help=f"comma list of {', '.join(SHAPES)} or TxHxFxExk: the layer shapes whose launches compile")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="activation and weight dtype")
    p.add_argument("--all-configs", action="store_true", help="every autotune configuration, not only the first")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (shown only on a terminal)")
    args = p.parse_args(argv)
    try:
        shapes = parse_shapes(args.shapes)
    except ValueError as exc:
        raise cli.UserError(str(exc)) from None
    if args.capability < 70:
        raise cli.UserError(f"--capability must be >= 70 (the kernels need sm_70+), got {args.capability}")
    rows = []
    for shape in shapes:
        rows += compile_check(args.capability, DTYPES[args.dtype], args.all_configs, shape, not args.no_progress)
    print_table(rows)
    found = problems(rows, args.capability)
    for line in found:
        print(f"compile_kernels.py: check failed: {line}", file=sys.stderr)
    audited = "" if any("reg" in r for r in rows) else " (cuobjdump not found: registers and spills not audited)"
    print(f"compile_kernels: {len(rows)} compiles for sm_{args.capability} ({args.shapes}, {args.dtype}, "
          f"{'all' if args.all_configs else 'first'} configurations): "
          f"{len(found) or 'no'} problem{'s' if len(found) != 1 else ''}{audited}")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(cli.run("compile_kernels.py", main))
