#!/usr/bin/env python
"""Benchmark the MoE FFN: our Triton layer against torch._grouped_mm, a per-expert matmul loop and a
dense GEMM chain of the same FLOPs (forward and forward+backward TFLOP/s, peak memory); then one row per
kernel file of megatron_jai.kernels that the layer runs (the routing op, the slot combine) against its
plain-torch reference.

    python tools/bench_moe.py                          # all shapes, bf16, on a CUDA GPU
    python tools/bench_moe.py --shapes jai75b --check  # check outputs/grads against fp32 first
    TRITON_INTERPRET=1 python tools/bench_moe.py --smoke   # tiny fp32 run on CPU (exercises the script)

FLOPs = 2*T*k*3*H*F forward, 3x that forward+backward. Peak memory is the largest allocation above the
inputs and weights during one forward+backward. Targets (issue 11, H100, forward+backward): ours >=
1.15x the torch._grouped_mm layer on every shape, and 620 / 570 / 450 TFLOP/s on the JAI-75B /
Mixtral-like / fine-grained shapes.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from typing import Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_jai.cli import UserError  # noqa: E402


@dataclass(frozen=True)
class Shape:
    name: str
    tokens: int
    hidden: int
    ffn: int
    experts: int
    top_k: int
    target_tflops: Optional[float] = None  # forward+backward goal of our layer (H100)

    @property
    def forward_flops(self) -> float:
        return 2.0 * self.tokens * self.top_k * 3 * self.hidden * self.ffn


SHAPES = {
    "jai75b": Shape("jai75b", 8192, 5120, 17920, 4, 2, 620.0),
    "mixtral": Shape("mixtral", 8192, 4096, 14336, 8, 2, 570.0),
    "finegrained": Shape("finegrained", 8192, 2048, 1408, 64, 6, 450.0),
}
SPEEDUP_TARGET = 1.15  # over the torch._grouped_mm layer, forward+backward
SMOKE_SHAPE = Shape("smoke", 48, 32, 16, 4, 2)
GROUP_ALIGN = 16  # torch._grouped_mm wants each token group padded to a multiple of 16 rows


# ---- implementations: (hidden, router_logits, w_gate_up, w_down) -> [T, H] ------------------------

def ours(hidden, logits, w_gate_up, w_down, top_k, recompute=False):
    from megatron_jai.moe.functional import moe_ffn

    return moe_ffn(hidden, logits, w_gate_up, w_down, top_k, normalize_topk=True, backend="auto",
                   recompute_activation=recompute)


def _sorted_routing(logits, num_experts, top_k):
    from megatron_jai.moe.reference import topk_routing

    weights, ids = topk_routing(logits, top_k, normalize_topk=True)
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    # scatter_add, not bincount: bincount on CUDA synchronises with the host (it sizes its output).
    counts = torch.zeros(num_experts, dtype=torch.long, device=flat.device).scatter_add_(
        0, flat, torch.ones_like(flat))
    return weights, order, counts


def grouped_mm(hidden, logits, w_gate_up, w_down, top_k):
    """The same MoE FFN on torch._grouped_mm: groups padded to 16 rows, weights as w.transpose(-2, -1)."""
    num_experts = w_gate_up.shape[0]
    weights, order, counts = _sorted_routing(logits, num_experts, top_k)
    num_slots = order.numel()
    padded = (counts + GROUP_ALIGN - 1) // GROUP_ALIGN * GROUP_ALIGN
    padded_ends = torch.cumsum(padded, 0)
    starts = torch.cumsum(counts, 0) - counts
    expert_of_sorted = torch.repeat_interleave(torch.arange(num_experts, device=hidden.device), counts,
                                               output_size=num_slots)
    rank = torch.arange(num_slots, device=hidden.device) - starts[expert_of_sorted]
    dest = (padded_ends - padded)[expert_of_sorted] + rank  # padded row of each sorted slot
    capacity = num_slots + GROUP_ALIGN * num_experts  # static upper bound: no host synchronisation
    x = hidden.new_zeros((capacity, hidden.shape[1])).index_copy(0, dest, hidden[order // top_k])
    offs = padded_ends.to(torch.int32)
    gate_up = torch._grouped_mm(x, w_gate_up.transpose(-2, -1), offs=offs)
    gate, up = gate_up.chunk(2, dim=-1)
    y = torch._grouped_mm(torch.nn.functional.silu(gate) * up, w_down.transpose(-2, -1), offs=offs)
    y_slots = torch.empty((num_slots, y.shape[1]), dtype=y.dtype, device=y.device)
    y_slots = y_slots.index_copy(0, order, y[dest])
    out = (y_slots.view(-1, top_k, y.shape[1]).float() * weights[..., None]).sum(1)
    return out.to(hidden.dtype)


def expert_loop(hidden, logits, w_gate_up, w_down, top_k):
    """Per-expert loop of torch.matmul over each expert's gathered tokens."""
    num_experts = w_gate_up.shape[0]
    weights, order, counts = _sorted_routing(logits, num_experts, top_k)
    out = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
    flat_w = weights.reshape(-1)
    start = 0
    for e, count in enumerate(counts.tolist()):
        slots = order[start:start + count]
        start += count
        if count == 0:
            continue
        tokens = slots // top_k
        gate, up = torch.matmul(hidden[tokens], w_gate_up[e].t()).chunk(2, dim=-1)
        y = torch.matmul(torch.nn.functional.silu(gate) * up, w_down[e].t())
        out = out.index_add(0, tokens, y.float() * flat_w[slots, None])
    return out.to(hidden.dtype)


def dense_chain(x, w1, w2):
    """One dense GEMM chain with the same FLOPs: [T*k, H] @ [H, 2F] -> SwiGLU -> @ [F, H]."""
    gate, up = torch.matmul(x, w1).chunk(2, dim=-1)
    return torch.matmul(torch.nn.functional.silu(gate) * up, w2)


IMPLS = ("ours", "grouped_mm", "loop", "dense")


# ---- measurement ---------------------------------------------------------------------------------

class Timer:
    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def measure(self, fn, iters, warmup):
        """Mean seconds per call (CUDA events on GPU, perf_counter on CPU)."""
        for _ in range(warmup):
            fn()
        self.sync()
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(iters):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3 / iters
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - t0) / iters


def make_inputs(shape, device, dtype, seed):
    g = torch.Generator(device="cpu").manual_seed(seed)

    def randn(*size, scale=1.0):
        return (torch.randn(*size, generator=g) * scale).to(device=device, dtype=dtype)

    hidden = randn(shape.tokens, shape.hidden)
    logits = torch.randn(shape.tokens, shape.experts, generator=g).to(device)  # fp32 router logits
    w_gate_up = randn(shape.experts, 2 * shape.ffn, shape.hidden, scale=shape.hidden ** -0.5)
    w_down = randn(shape.experts, shape.hidden, shape.ffn, scale=shape.ffn ** -0.5)
    return [t.requires_grad_() for t in (hidden, logits, w_gate_up, w_down)]


def make_call(impl, shape, inputs, recompute):
    """(forward thunk, tensors to differentiate, output rows) for one implementation."""
    if impl == "dense":
        hidden, _, w_gate_up, w_down = inputs
        x = hidden.detach().repeat(shape.top_k, 1).requires_grad_()
        w1 = w_gate_up[0].detach().t().contiguous().requires_grad_()  # [H, 2F]
        w2 = w_down[0].detach().t().contiguous().requires_grad_()  # [F, H]
        return (lambda: dense_chain(x, w1, w2)), [x, w1, w2], x.shape[0]
    fn = {"ours": lambda *a: ours(*a, recompute=recompute), "grouped_mm": grouped_mm, "loop": expert_loop}[impl]
    return (lambda: fn(*inputs, shape.top_k)), list(inputs), shape.tokens


def peak_extra_bytes(device, fwd_bwd):
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fwd_bwd()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def check(shape, inputs, impls, recompute, tol):
    """Each implementation's output and input gradients against the per-expert loop run in fp32 on
    fp32 copies of the inputs, row by row (:func:`megatron_jai.moe.reference.row_errors`: a row's max
    error over its scale). Returns the names of the tensors with a row over ``tol``."""
    from megatron_jai.moe.reference import row_errors

    grad = torch.randn(shape.tokens, shape.hidden, generator=torch.Generator().manual_seed(1)).to(inputs[0])
    exact = [t.detach().float().requires_grad_() for t in inputs]
    with _no_tf32():
        out = expert_loop(*exact, shape.top_k)
        want = [out.detach()] + list(torch.autograd.grad(out, exact, grad.float()))
    names = ("output", "d hidden", "d router logits", "d w_gate_up", "d w_down")
    failed = []
    for impl in impls:
        if impl == "dense":
            continue
        call, params, _ = make_call(impl, shape, inputs, recompute)
        out = call()
        got = [out.detach()] + list(torch.autograd.grad(out, params, grad))
        for name, a, b in zip(names, got, want):
            errors = row_errors(a, b)
            worst = int(errors.argmax())
            bad = int((errors > tol).sum())
            print(f"  check {shape.name}: {impl} vs fp32 {name}: worst row {worst} error {errors[worst]:.3e}, "
                  f"{bad} of {errors.numel()} rows over {tol:g}")
            if bad:
                failed.append(f"{impl} {name}")
        del got, out
    return failed


class _no_tf32:
    """fp32 matmuls in full precision (the check's yardstick), restoring torch's setting after."""

    def __enter__(self):
        self.saved = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False

    def __exit__(self, *exc):
        torch.backends.cuda.matmul.allow_tf32 = self.saved


def check_routing(device):
    """The compiled routing op of ``device`` (CUDA on a GPU, C++ on CPU) against the C++ op and the torch
    reference, bit for bit. Raises :class:`CheckFailed` if the op was not built (for CUDA: built
    without CUDA), instead of letting the Python entry point fall back to the reference."""
    from megatron_jai.kernels.routing import load_extension, routing_metadata_reference

    ext = load_extension()
    if ext is None:
        raise CheckFailed("megatron_jai.kernels._routing is not built (pip install --no-build-isolation -e .)")
    if device.type == "cuda" and not ext.has_cuda:
        raise CheckFailed("megatron_jai.kernels._routing was built without CUDA: rebuild it on a machine with "
                          "a CUDA torch and nvcc (pip install --no-build-isolation --no-deps -e .)")
    op = ext.routing_metadata_cuda if device.type == "cuda" else ext.routing_metadata_cpu
    g = torch.Generator().manual_seed(0)
    sizes = ((1, 1, 1), (0, 2, 4), (777, 1, 4), (8192, 2, 4), (8192, 6, 64), (100003, 1, 8), (4096, 2, 300))
    for tokens, top_k, experts in sizes:
        ids = torch.randint(-1, experts + 1, (tokens, top_k), generator=g)  # -1 and E: skipped slots
        want = routing_metadata_reference(ids, experts)
        for dtype in (torch.int64, torch.int32):
            got = op(ids.to(device=device, dtype=dtype), experts)
            cpu = ext.routing_metadata_cpu(ids.to(dtype), experts)
            for name, a, b, c in zip(want._fields, got, want, cpu):
                if not (torch.equal(a.cpu(), b) and torch.equal(c, b)):
                    raise CheckFailed(f"routing op ({device.type}) disagrees with the reference on {name} "
                                      f"({tokens} tokens, k={top_k}, {experts} experts, {dtype})")
    print(f"  check routing op ({device.type}): bit-identical to the C++ op and the reference on "
          f"{len(sizes)} sizes, int32 and int64 ids")


class CheckFailed(Exception):
    """The routing-op check failed (reported after the table; exit 1)."""


def bench_shape(shape, impls, args, device, dtype, timer, failures, backend):
    """The layer rows and the kernel rows of one shape; a failed --check is appended to ``failures``
    (the timings go on)."""
    inputs = make_inputs(shape, device, dtype, args.seed)
    if args.check:
        failed = check(shape, inputs, impls, args.recompute, args.check_tol)
        if failed:
            failures.append(f"{shape.name}: rows over the tolerance {args.check_tol:g} in " + ", ".join(failed))
    rows = []
    for impl in impls:
        call, params, out_rows = make_call(impl, shape, inputs, args.recompute)
        grad = torch.randn(out_rows, shape.hidden, device=device, dtype=dtype)

        def forward(call=call):
            with torch.no_grad():
                call()

        def forward_backward(call=call, params=params, grad=grad):
            torch.autograd.grad(call(), params, grad)

        t0 = time.perf_counter()
        forward_backward()  # the first call compiles and autotunes the kernels
        timer.sync()
        first_s = time.perf_counter() - t0
        t_fwd = timer.measure(forward, args.iters, args.warmup)
        t_all = timer.measure(forward_backward, args.iters, args.warmup)
        rows.append({"shape": shape, "impl": impl, "fwd_s": t_fwd, "all_s": t_all,
                     "fwd_tflops": shape.forward_flops / t_fwd / 1e12,
                     "all_tflops": 3 * shape.forward_flops / t_all / 1e12,
                     "peak": peak_extra_bytes(device, forward_backward), "first_s": first_s})
    kernels = kernel_rows(shape, inputs, timer, args, backend) if "ours" in impls else []
    del inputs
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows, kernels


def kernel_rows(shape, inputs, timer, args, backend):
    """Each kernel beside the layer against its plain-torch reference, on the shape's top-k routing (the
    expert FFN itself is the layer table's ``ours``); the combine only where the Triton kernels run."""
    from megatron_jai.kernels.moe_combine import combine_slots, combine_slots_reference
    from megatron_jai.kernels.routing import routing_metadata, routing_metadata_reference
    from megatron_jai.moe.reference import topk_routing

    hidden = inputs[0].detach()
    _, ids = topk_routing(inputs[1].detach(), shape.top_k)
    slot_rows = hidden.repeat_interleave(shape.top_k, dim=0)
    e = shape.experts
    pairs = {"routing_metadata": (lambda: routing_metadata(ids, e), lambda: routing_metadata_reference(ids, e))}
    if backend == "triton":
        pairs["combine_slots"] = (lambda: combine_slots(slot_rows, ids, e, hidden.dtype),
                                  lambda: combine_slots_reference(slot_rows, ids, e, hidden.dtype))
    return [{"shape": shape, "kernel": name, "ours_s": timer.measure(ours, args.iters, args.warmup),
             "torch_s": timer.measure(reference, args.iters, args.warmup)}
            for name, (ours, reference) in pairs.items()]


def print_kernel_table(rows):
    header = f"{'kernel rows: shape (T,H,F,E,k)':<34} {'kernel':<17} {'ours ms':>9} {'torch ms':>9} {'vs torch':>8}"
    print(header)
    print("-" * len(header))
    for row in rows:
        s = row["shape"]
        label = f"{s.name} ({s.tokens},{s.hidden},{s.ffn},{s.experts},{s.top_k})"
        print(f"{label:<34} {row['kernel']:<17} {row['ours_s'] * 1e3:>9.3f} {row['torch_s'] * 1e3:>9.3f} "
              f"{row['torch_s'] / row['ours_s']:>7.2f}x")


def print_table(rows):
    header = (f"{'shape (T,H,F,E,k)':<34} {'impl':<11} {'fwd ms':>9} {'fwd TF/s':>9} {'f+b ms':>9} "
              f"{'f+b TF/s':>9} {'peak GiB':>9} {'vs gmm':>7} {'1st s':>7}")
    print(header)
    print("-" * len(header))
    for row in rows:
        s = row["shape"]
        ref = next((r for r in rows if r["shape"] == s and r["impl"] == "grouped_mm"), None)
        speedup = f"{ref['all_s'] / row['all_s']:.2f}x" if ref else "-"
        peak = f"{row['peak'] / 2**30:.2f}" if row["peak"] is not None else "-"
        label = f"{s.name} ({s.tokens},{s.hidden},{s.ffn},{s.experts},{s.top_k})"
        print(f"{label:<34} {row['impl']:<11} {row['fwd_s'] * 1e3:>9.3f} {row['fwd_tflops']:>9.1f} "
              f"{row['all_s'] * 1e3:>9.3f} {row['all_tflops']:>9.1f} {peak:>9} {speedup:>7} {row['first_s']:>7.1f}")


def targets_line(rows):
    verdicts = []
    for shape in dict.fromkeys(r["shape"] for r in rows):
        got = {r["impl"]: r for r in rows if r["shape"] == shape}
        if "ours" not in got:
            continue
        if "grouped_mm" in got:
            ratio = got["grouped_mm"]["all_s"] / got["ours"]["all_s"]
            verdicts.append(f"{shape.name} {ratio:.2f}x gmm {'MET' if ratio >= SPEEDUP_TARGET else 'NOT MET'}")
        if shape.target_tflops:
            tf = got["ours"]["all_tflops"]
            verdicts.append(f"{shape.name} {tf:.0f}/{shape.target_tflops:.0f} TFLOP/s "
                            f"{'MET' if tf >= shape.target_tflops else 'NOT MET'}")
    goals = ", ".join(f"{s.name} {s.target_tflops:.0f}" for s in SHAPES.values())
    return (f"targets (f+b, H100: >= {SPEEDUP_TARGET:.2f}x grouped_mm; TFLOP/s {goals}): "
            + ("; ".join(verdicts) or "n/a"))


def parse_shapes(text):
    shapes = []
    for item in text.split(","):
        item = item.strip()
        if item in SHAPES:
            shapes.append(SHAPES[item])
        elif item.count("x") == 4:
            t, h, f, e, k = (int(v) for v in item.split("x"))
            if min(t, h, f, e, k) < 1 or k > e:
                raise ValueError(f"shape {item!r}: all sizes must be >= 1 and k <= E")
            shapes.append(Shape(item, t, h, f, e, k))
        else:
            raise ValueError(f"unknown shape {item!r}: use {', '.join(SHAPES)} or TxHxFxExk")
    return shapes


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default=",".join(SHAPES),
                   help=f"comma list of {', '.join(SHAPES)} or TxHxFxExk (default: all)")
    p.add_argument("--impls", default=",".join(IMPLS), help=f"comma list of {', '.join(IMPLS)}")
    p.add_argument("--iters", type=int, default=20, help="timed iterations per measurement")
    p.add_argument("--warmup", type=int, default=5, help="untimed iterations first (autotuning happens here)")
    p.add_argument("--check", action="store_true",
                   help="first: the routing op bit for bit, then every implementation's output and gradients "
                        "against an fp32 run, row by row")
    p.add_argument("--check-tol", type=float, default=5e-2,
                   help="max error of any row for --check: the row's max |error| over its scale (bf16 rounding "
                        "gives ~1e-2; a corrupted row gives O(1))")
    p.add_argument("--recompute", action="store_true", help="our layer recomputes SwiGLU in backward")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true",
                   help="tiny fp32 shape on CPU (Triton interpreter if TRITON_INTERPRET=1, else reference)")
    args = p.parse_args(argv)
    try:
        impls = [i.strip() for i in args.impls.split(",") if i.strip()]
        bad = [i for i in impls if i not in IMPLS]
        if bad:
            raise ValueError(f"unknown implementation(s) {bad}: choose from {', '.join(IMPLS)}")
        shapes = [SMOKE_SHAPE] if args.smoke else parse_shapes(args.shapes)
        if args.iters < 1 or args.warmup < 0:
            raise ValueError("--iters must be >= 1 and --warmup >= 0")
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if args.smoke:
        device, dtype = torch.device("cpu"), torch.float32
        args.iters, args.warmup, args.check = 1, 0, True
        impls = [i for i in impls if i != "grouped_mm" or hasattr(torch, "_grouped_mm")]
    else:
        if not torch.cuda.is_available():
            raise UserError("bench_moe.py measures on a CUDA GPU and none is available (torch.cuda.is_available() "
                            "is False); use --smoke for a tiny CPU run of the script")
        device, dtype = torch.device("cuda"), torch.bfloat16
        if "grouped_mm" in impls and not hasattr(torch, "_grouped_mm"):
            raise UserError(f"torch {torch.__version__} has no torch._grouped_mm (the baseline needs torch >= 2.8); "
                            f"upgrade torch or leave it out with --impls ours,loop,dense")
    timer = Timer(device)
    from megatron_jai.moe.functional import resolve_backend

    backend = resolve_backend(None, device)
    import triton

    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"bench_moe: {gpu}, torch {torch.__version__}, triton {triton.__version__}, {dtype}, our backend "
          f"{backend}, iters {args.iters}, "
          f"warmup {args.warmup}, recompute {args.recompute}" + (" (smoke)" if args.smoke else ""))
    rows, kernels, failures = [], [], []
    if args.check:
        try:
            check_routing(device)
        except CheckFailed as err:
            failures.append(str(err))
    for shape in shapes:
        layer, per_kernel = bench_shape(shape, impls, args, device, dtype, timer, failures, backend)
        rows += layer
        kernels += per_kernel
    print_table(rows)
    if kernels:
        print_kernel_table(kernels)
    if args.smoke:
        print("smoke run: CPU timings of a tiny shape exercise the script; they are not measurements")
    else:
        print(targets_line(rows))
    for failure in failures:
        print(f"bench_moe.py: check failed: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    from megatron_jai import cli

    sys.exit(cli.run("bench_moe.py", main))
