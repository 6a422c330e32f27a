"""Triton expert kernels under TRITON_INTERPRET=1 (fp32) against the torch reference -- outputs and the
gradients of hidden, both weight tensors and the routing weights -- the slot combine against its
reference, gradcheck of the reference in fp64, the functional API, kernels/ importing nothing of the
package, an sm_90 ahead-of-time compilation of every kernel (tools/compile_kernels.py), and the
benchmark's smoke mode. The interpreter is slow: shapes are tiny and tiles are 16 wide."""
import ast
import os
import sys

import pytest
import torch

from conftest import REPO_ROOT, load_tool, run_cmd, run_tool


def _import_kernels_interpreted():
    """Import the kernels with TRITON_INTERPRET=1 (Triton picks the interpreter when it decorates
    them), then restore the environment so the other test modules and their subprocesses are unaffected."""
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        from megatron_jai.kernels import moe_grouped_gemm
    finally:
        if previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = previous
    return moe_grouped_gemm


KERNELS = _import_kernels_interpreted()  # first: before anything else can import the kernels

from megatron_jai.kernels.moe_combine import combine_slots, combine_slots_reference  # noqa: E402
from megatron_jai.kernels.moe_grouped_gemm import grouped_expert_ffn_reference  # noqa: E402
from megatron_jai.kernels.routing import routing_metadata_reference  # noqa: E402
from megatron_jai.moe import functional  # noqa: E402
from megatron_jai.moe.reference import moe_ffn_reference  # noqa: E402


@pytest.fixture(autouse=True)
def _interpreter_env(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # what the functional API checks at call time


def _kernels():
    if not KERNELS.INTERPRET:
        pytest.fail("megatron_jai.kernels.moe_grouped_gemm was imported (by another test module) before "
                    "TRITON_INTERPRET=1 was set: the kernels are not in interpreter mode")
    return KERNELS


def _inputs(n, h, f, e, k, seed, dtype=torch.float32, empty_experts=(), single_token_expert=None,
            skip_fraction=0.2):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g).to(dtype)
    ids = torch.randint(0, e, (n, k), generator=g)
    for empty in empty_experts:  # move their slots to another expert
        ids = torch.where(ids == empty, (empty + 1) % e, ids)
    ids = torch.where(torch.rand(n, k, generator=g) < skip_fraction, -1, ids)
    if single_token_expert is not None:
        ids = torch.where(ids == single_token_expert, (single_token_expert + 1) % e, ids)
        ids[n // 2, 0] = single_token_expert
    weights = torch.rand(n, k, generator=g) + 0.1
    w_gate_up = (torch.randn(e, 2 * f, h, generator=g) / h ** 0.5).to(dtype)
    w_down = (torch.randn(e, h, f, generator=g) / f ** 0.5).to(dtype)
    return hidden, ids, weights, w_gate_up, w_down


def _outputs_and_grads(fn, hidden, ids, weights, w_gate_up, w_down, grad_out, **kw):
    leaves = [t.detach().clone().requires_grad_() for t in (hidden, weights, w_gate_up, w_down)]
    out = fn(leaves[0], ids, leaves[1], leaves[2], leaves[3], **kw)
    grads = torch.autograd.grad(out, leaves, grad_out)
    return out.detach(), grads


# (N, H, F, E, k, empty experts, single-token expert, recompute): odd sizes that are not multiples of
# the 16-wide tiles, H/F multiples of the tile (the unmasked EVEN_K path), empty experts, an expert
# with one token, skipped slots, k = 1..3, both SwiGLU storage modes, and more experts than the
# 16 lanes of the vectorised expert search (19 -> 32 lanes, the last expert empty).
CASES = [
    (23, 40, 24, 4, 2, (3,), None, False),
    (37, 32, 16, 5, 3, (), 1, True),
    (1, 17, 9, 3, 1, (), None, False),
    (50, 33, 20, 6, 2, (0, 4), 2, True),
    (21, 24, 20, 19, 2, (1, 5, 18), 7, False),
]


@pytest.mark.parametrize("n,h,f,e,k,empty,single,recompute", CASES)
def test_triton_matches_reference(n, h, f, e, k, empty, single, recompute):
    kernels = _kernels()
    hidden, ids, weights, w_gate_up, w_down = _inputs(n, h, f, e, k, seed=n + h, empty_experts=empty,
                                                      single_token_expert=single)
    counts = routing_metadata_reference(ids, e).tokens_per_expert
    for expert in empty:
        assert counts[expert] == 0
    if single is not None:
        assert counts[single] == 1
    grad_out = torch.randn(n, h, generator=torch.Generator().manual_seed(1))
    out, grads = _outputs_and_grads(kernels.grouped_expert_ffn_triton, hidden, ids, weights, w_gate_up,
                                    w_down, grad_out, recompute_activation=recompute)
    ref, ref_grads = _outputs_and_grads(grouped_expert_ffn_reference, hidden, ids, weights, w_gate_up,
                                        w_down, grad_out)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    for name, got, want in zip(("hidden", "routing weights", "w_gate_up", "w_down"), grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=lambda m: f"grad of {name}: {m}")
    skipped = ~((ids >= 0) & (ids < e))
    assert torch.all(grads[1][skipped] == 0)
    for expert in empty:  # experts without tokens get exactly zero weight gradients
        assert torch.all(grads[2][expert] == 0) and torch.all(grads[3][expert] == 0)


def test_split_k_weight_gradients(monkeypatch):
    """Split-K weight gradients (each expert's rows in 3 chunks, fp32 partial sums added in order) equal
    the reference, with the SwiGLU recompute (its routing weight is loaded per chunk)."""
    kernels = _kernels()
    hidden, ids, weights, w_gate_up, w_down = _inputs(53, 24, 20, 3, 2, seed=12, empty_experts=(1,))
    grad_out = torch.randn(53, 24, generator=torch.Generator().manual_seed(2))
    monkeypatch.setenv("JAI_MOE_WGRAD_SPLIT_K", "3")
    assert kernels.wgrad_splits(3, 40, 24, 106, torch.device("cpu")) == 3
    _, grads = _outputs_and_grads(kernels.grouped_expert_ffn_triton, hidden, ids, weights, w_gate_up, w_down,
                                  grad_out, recompute_activation=True)
    _, ref_grads = _outputs_and_grads(grouped_expert_ffn_reference, hidden, ids, weights, w_gate_up, w_down,
                                      grad_out)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert torch.all(grads[2][1] == 0) and torch.all(grads[3][1] == 0)  # the empty expert
    monkeypatch.setenv("JAI_MOE_WGRAD_SPLIT_K", "0")
    with pytest.raises(ValueError, match="JAI_MOE_WGRAD_SPLIT_K"):
        kernels.wgrad_splits(3, 40, 24, 106, torch.device("cpu"))
    monkeypatch.delenv("JAI_MOE_WGRAD_SPLIT_K")
    assert kernels.wgrad_splits(3, 40, 24, 106, torch.device("cpu")) == 1  # automatic: CUDA only


def test_recomputed_activation_is_bit_identical():
    """The weight gradient from the recomputed weighted activation equals the stored one bit for bit."""
    kernels = _kernels()
    hidden, ids, weights, w_gate_up, w_down = _inputs(29, 20, 12, 3, 2, seed=13)
    grad_out = torch.randn(29, 20, generator=torch.Generator().manual_seed(3))
    stored, recomputed = (_outputs_and_grads(kernels.grouped_expert_ffn_triton, hidden, ids, weights, w_gate_up,
                                             w_down, grad_out, recompute_activation=r) for r in (False, True))
    assert torch.equal(stored[0], recomputed[0])
    assert all(torch.equal(a, b) for a, b in zip(stored[1], recomputed[1]))


def test_row_errors_find_a_corrupted_row():
    from megatron_jai.moe.reference import row_errors

    want = torch.randn(2000, 64, generator=torch.Generator().manual_seed(0))
    got = want * (1 + 4e-3 * torch.randn(2000, 64, generator=torch.Generator().manual_seed(1)))
    got[1234] = 0.0  # one dropped row
    frobenius = float((got - want).norm() / want.norm())
    assert frobenius < 5e-2  # what the old check accepted
    errors = row_errors(got, want)
    assert int(errors.argmax()) == 1234 and errors[1234] > 0.9 and int((errors > 5e-2).sum()) == 1
    zeros = torch.zeros(3, 8)
    assert torch.all(row_errors(zeros, zeros) == 0)  # all-zero rows are no error
    with pytest.raises(ValueError, match="shapes"):
        row_errors(zeros, torch.zeros(3, 9))


def test_all_slots_skipped_gives_zeros():
    kernels = _kernels()
    hidden, ids, weights, w_gate_up, w_down = _inputs(9, 20, 12, 3, 2, seed=5, skip_fraction=1.0)
    out, grads = _outputs_and_grads(kernels.grouped_expert_ffn_triton, hidden, ids, weights, w_gate_up,
                                    w_down, torch.ones(9, 20))
    assert torch.all(out == 0)
    assert all(torch.all(g == 0) for g in grads)


def test_empty_batch():
    kernels = _kernels()
    hidden, ids, weights, w_gate_up, w_down = _inputs(0, 8, 4, 3, 2, seed=6)
    out, grads = _outputs_and_grads(kernels.grouped_expert_ffn_triton, hidden, ids, weights, w_gate_up,
                                    w_down, torch.zeros(0, 8))
    assert out.shape == (0, 8)
    assert grads[2].shape == w_gate_up.shape and torch.all(grads[2] == 0)


def test_fp16_forward_close_to_reference():
    kernels = _kernels()
    hidden, ids, weights, w_gate_up, w_down = _inputs(21, 32, 16, 4, 2, seed=7, dtype=torch.float16)
    out = kernels.grouped_expert_ffn_triton(hidden, ids, weights, w_gate_up, w_down)
    ref = grouped_expert_ffn_reference(hidden.double(), ids, weights.double(), w_gate_up.double(),
                                       w_down.double())
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.double(), ref, rtol=2e-2, atol=2e-3)


def test_moe_ffn_triton_matches_reference_with_router_grads():
    _kernels()
    t, h, f, e, k = 19, 24, 16, 4, 2
    g = torch.Generator().manual_seed(11)
    tensors = [torch.randn(t, h, generator=g), torch.randn(t, e, generator=g),
               torch.randn(e, 2 * f, h, generator=g) / h ** 0.5, torch.randn(e, h, f, generator=g) / f ** 0.5]
    grad_out = torch.randn(t, h, generator=g)
    results = []
    for backend in ("triton", "reference"):
        leaves = [x.clone().requires_grad_() for x in tensors]
        out = functional.moe_ffn(*leaves, top_k=k, normalize_topk=True, backend=backend)
        results.append((out.detach(), torch.autograd.grad(out, leaves, grad_out)))
    (out, grads), (ref, ref_grads) = results
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert grads[1].abs().sum() > 0  # the router logits do receive a gradient
    direct = moe_ffn_reference(*tensors, top_k=k)
    torch.testing.assert_close(ref, direct)


def test_backend_resolution(monkeypatch):
    _kernels()
    assert functional.resolve_backend(None, torch.device("cpu")) == "triton"  # interpreter is on
    monkeypatch.setenv("JAI_MOE_BACKEND", "reference")
    assert functional.resolve_backend(None, torch.device("cpu")) == "reference"
    with pytest.raises(ValueError, match="backend"):
        functional.resolve_backend("cublas", torch.device("cpu"))
    with pytest.raises(ValueError, match="w_down"):
        functional.grouped_expert_ffn(torch.zeros(3, 8), torch.zeros(3, 2, dtype=torch.long), torch.zeros(3, 2),
                                      torch.zeros(2, 6, 8), torch.zeros(2, 8, 4))


@pytest.mark.parametrize("normalize", [True, False])
def test_reference_gradcheck_fp64(normalize):
    g = torch.Generator().manual_seed(3)
    t, h, f, e, k = 6, 4, 2, 3, 2
    hidden = torch.randn(t, h, generator=g, dtype=torch.float64, requires_grad=True)
    logits = torch.randn(t, e, generator=g, dtype=torch.float64, requires_grad=True)
    w_gate_up = torch.randn(e, 2 * f, h, generator=g, dtype=torch.float64, requires_grad=True)
    w_down = torch.randn(e, h, f, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda *a: moe_ffn_reference(*a, top_k=k, normalize_topk=normalize),
        (hidden, logits, w_gate_up, w_down))
    ids = torch.tensor([[0, 2], [-1, 1], [2, 2], [1, -1], [0, 1], [-1, -1]])
    weights = torch.rand(t, k, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, w, a, b: grouped_expert_ffn_reference(x, ids, w, a, b), (hidden, weights, w_gate_up, w_down))


def test_rectangular_interpreter_tiles():
    """BLOCK_M != BLOCK_N != BLOCK_K (a fresh process: tiles are fixed when the kernels are imported)."""
    script = ("import torch\n"
              "from megatron_jai.kernels.moe_grouped_gemm import grouped_expert_ffn_triton\n"
              "from megatron_jai.kernels.moe_grouped_gemm import grouped_expert_ffn_reference as ref\n"
              "g = torch.Generator().manual_seed(0)\n"
              "x = torch.randn(29, 48, generator=g); ids = torch.randint(-1, 3, (29, 2), generator=g)\n"
              "w = torch.rand(29, 2, generator=g); a = torch.randn(3, 40, 48, generator=g) / 7\n"
              "b = torch.randn(3, 48, 20, generator=g) / 5; d = torch.randn(29, 48, generator=g)\n"
              "res = []\n"
              "for fn in (grouped_expert_ffn_triton, ref):\n"
              "    leaves = [t.clone().requires_grad_() for t in (x, w, a, b)]\n"
              "    out = fn(leaves[0], ids, *leaves[1:])\n"
              "    res.append([out] + list(torch.autograd.grad(out, leaves, d)))\n"
              "print('max err', max(float((p - q).abs().max() / q.abs().max()) for p, q in zip(*res)))\n")
    for tile in ("32,16,16", "16,32,32"):
        proc = run_cmd([sys.executable, "-c", script], timeout=600,
                       env={"TRITON_INTERPRET": "1", "JAI_MOE_INTERPRET_TILE": tile})
        err = float(proc.stdout.split("max err")[1])
        assert err < 1e-5, (tile, proc.stdout)


@pytest.mark.parametrize("n,k,e,cols", [(17, 3, 4, 70), (1, 1, 2, 5), (0, 2, 3, 8)])
def test_combine_slots_matches_reference(n, k, e, cols):
    """Odd column counts over the 64-wide interpreter block, skipped and out-of-range ids whose rows hold
    NaN (ignored, not summed), fp32 and fp16 outputs."""
    _kernels()
    g = torch.Generator().manual_seed(n + cols)
    ids = torch.randint(-1, e + 1, (n, k), generator=g)
    rows = torch.randn(n * k, cols, generator=g)
    rows[~((ids >= 0) & (ids < e)).reshape(-1)] = float("nan")
    for rows_dtype, out_dtype in ((torch.float32, torch.float32), (torch.float16, torch.float16),
                                  (torch.float16, torch.float32)):
        got = combine_slots(rows.to(rows_dtype), ids, e, out_dtype)
        want = combine_slots_reference(rows.to(rows_dtype), ids, e, out_dtype)
        assert got.dtype == out_dtype and not got.isnan().any()
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_kernels_import_nothing_of_the_package():
    """kernels/ stands alone: no file imports megatron_jai (also inside functions, or through importlib);
    its own modules are imported relatively."""
    kernels_dir = os.path.join(REPO_ROOT, "kernels")
    offenders = []
    for name in sorted(os.listdir(kernels_dir)):
        if not name.endswith(".py"):
            continue
        for node in ast.walk(ast.parse(open(os.path.join(kernels_dir, name)).read(), name)):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                modules = [node.module or ""] if node.level == 0 else []
            elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
                    "import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant):
                modules = [str(node.args[0].value)]
            else:
                continue
            offenders += [f"{name}:{node.lineno} {m}" for m in modules if m.split(".")[0] == "megatron_jai"]
    assert not offenders, offenders


def test_compile_kernels_for_sm90(tmp_path):
    """tools/compile_kernels.py: every kernel launch of a JAI-75B layer's forward + backward compiles to
    sm_90 (Triton + ptxas, no GPU), specialised as the launcher does (unit strides are constants), uses
    Hopper wgmma, and the first (JAI_MOE_AUTOTUNE=0) configurations neither spill nor use a stack."""
    # A fresh Triton cache, so the kernels really go through Triton's compiler and ptxas here.
    proc = run_cmd([sys.executable, os.path.join(REPO_ROOT, "tools", "compile_kernels.py")], timeout=600,
                   env={"TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": str(tmp_path / "triton-cache")})
    assert "9 compiles for sm_90 (jai75b, bf16, first configurations): no problems" in proc.stdout, proc.stdout
    gemms = [line.split() for line in proc.stdout.splitlines() if line.startswith(("_gate", "_rows", "_down", "_exp"))]
    assert len(gemms) == 8 and all(int(row[-3]) > 0 and row[-1] == "0/0" for row in gemms), proc.stdout


def test_compile_kernels_audit_and_refusals(capsys):
    """What the audit rejects (on rows it is given), and the tool's refusals: an unknown shape, and
    kernels imported in the interpreter (as in this process)."""
    tool = load_tool("compile_kernels")
    ok = {"kernel": "_rows_gemm_scatter_kernel", "variant": {}, "config": {"BLOCK_M": 64, "BLOCK_N": 64,
                                                                        "BLOCK_K": 32}, "wgmma": 4, "stack": 0}
    rows = [ok, {**ok, "stack": 160}, {**ok, "wgmma": 0}, {**ok, "local": 8},
            {**ok, "kernel": "_combine_slots_kernel", "wgmma": 0}, {**ok, "config": {}, "error": "out of resources"}]
    found = tool.problems(rows, 90)
    assert len(found) == 4 and "160 stack" in found[0] and "no wgmma" in found[1] and "8 local" in found[2] \
        and "does not compile: out of resources" in found[3], found
    assert len(tool.problems(rows, 80)) == 3  # wgmma is Hopper's
    _, err = run_tool(capsys, "compile_kernels", "--shapes", "huge", expect_rc=2)
    assert "unknown shape" in err
    _, err = run_tool(capsys, "compile_kernels", expect_rc=2)
    assert "TRITON_INTERPRET" in err and len(err.strip().splitlines()) == 1


def test_bench_smoke_and_cpu_refusal():
    bench = os.path.join(REPO_ROOT, "tools", "bench_moe.py")
    proc = run_cmd([sys.executable, bench, "--smoke"], env={"TRITON_INTERPRET": "1"}, timeout=600)
    assert "smoke" in proc.stdout and "ours vs fp32 d w_down: worst row" in proc.stdout, proc.stdout
    assert "check routing op (cpu): bit-identical to the C++ op" in proc.stdout, proc.stdout
    kernel_rows = [line.split()[2] for line in proc.stdout.splitlines() if line.startswith("smoke (")
                   and line.split()[2] in ("routing_metadata", "combine_slots")]
    assert kernel_rows == ["routing_metadata", "combine_slots"], proc.stdout
    refused = run_cmd([sys.executable, bench], env={"TRITON_INTERPRET": "0"}, check=False, timeout=300)
    assert refused.returncode != 0
    assert "CUDA" in refused.stderr and "Traceback" not in refused.stderr
