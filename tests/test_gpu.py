"""GPU checks (``pytest -m gpu``; skipped without CUDA by tests/conftest.py; scripts/gpu_check.sh runs
them): the Triton expert kernels in bf16 against the fp32 reference (``moe_ffn``, ``grouped_expert_ffn``
and the MoE layer; odd shapes, dropped slots, an empty expert, T = 1, split-K, recompute, run-to-run
bit-reproducibility), the CUDA routing op bit for bit against the C++ op, and short ``pretrain_jai.py``
runs of ``tiny-moe`` on the Triton backend, with and without DUS.v2 skips.

bf16 is compared row by row (:func:`megatron_jai.moe.reference.row_errors`: a row's max error over its
scale); rounding bf16 operands and intermediates gives about 1e-2, a wrong row gives O(1).
"""
import copy
import json
import math
import os
import sys
import warnings

import pytest
import torch

from conftest import REPO_ROOT, run_cmd

pytestmark = pytest.mark.gpu

ROW_TOL = 5e-2
NAMES = ("output", "d hidden", "d routing", "d w_gate_up", "d w_down")


@pytest.fixture(autouse=True)
def _exact_fp32():
    """The fp32 reference in full fp32 (no TF32), restored after."""
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = saved


def _assert_rows_close(got, want, label, tol=ROW_TOL):
    from megatron_jai.moe.reference import row_errors

    for name, a, b in zip(NAMES, got, want):
        assert a.shape == b.shape, (label, name)
        assert torch.isfinite(a).all(), f"{label} {name}: non-finite values"
        errors = row_errors(a, b)
        if errors.numel():
            worst = int(errors.argmax())
            assert errors[worst] <= tol, (f"{label} {name}: row {worst} error {errors[worst]:.3e} > {tol} "
                                          f"({int((errors > tol).sum())} of {errors.numel()} rows)")


def _grads(fn, tensors, grad_out, **kw):
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in tensors]
    out = fn(*leaves, **kw)
    wrt = [t for t in leaves if t.requires_grad]
    return [out.detach()] + list(torch.autograd.grad(out, wrt, grad_out))


def _expert_inputs(n, h, f, e, k, seed, empty=(), drop=0.0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g)
    ids = torch.randint(0, e, (n, k), generator=g)
    for x in empty:
        ids = torch.where(ids == x, (x + 1) % e, ids)
    ids = torch.where(torch.rand(n, k, generator=g) < drop, -1, ids)
    weights = torch.rand(n, k, generator=g) + 0.05
    w_gate_up = torch.randn(e, 2 * f, h, generator=g) / h ** 0.5
    w_down = torch.randn(e, h, f, generator=g) / f ** 0.5
    grad_out = torch.randn(n, h, generator=g)
    return hidden, ids, weights, w_gate_up, w_down, grad_out


def _cuda(*tensors, dtype=None):
    return [t.cuda() if dtype is None or not t.is_floating_point() else t.to("cuda", dtype) for t in tensors]


# (N, H, F, E, k, empty experts, dropped fraction, recompute): T = 1, odd sizes with dropped slots (-1)
# and an empty expert, 64 experts top-6, more experts than 64 search lanes, tile multiples (the
# unmasked paths); both SwiGLU storage modes. Few cases: each new shape compiles the kernels anew.
EXPERT_CASES = [
    (1, 96, 64, 4, 2, (), 0.0, False),
    (77, 200, 136, 5, 2, (3,), 0.2, True),
    (1025, 1024, 704, 64, 6, (5,), 0.05, False),
    (700, 256, 128, 100, 4, (0, 99), 0.1, True),
    (512, 1024, 768, 4, 2, (), 0.0, False),
]


@pytest.mark.parametrize("n,h,f,e,k,empty,drop,recompute", EXPERT_CASES)
def test_grouped_expert_ffn_bf16(n, h, f, e, k, empty, drop, recompute):
    from megatron_jai.moe.functional import grouped_expert_ffn

    hidden, ids, weights, w_gate_up, w_down, grad_out = _expert_inputs(n, h, f, e, k, seed=n + h + e,
                                                                       empty=empty, drop=drop)
    bf16 = [hidden.bfloat16(), w_gate_up.bfloat16(), w_down.bfloat16()]  # the values both sides see
    args = (bf16[0], ids, weights, bf16[1], bf16[2])
    got = _grads(lambda x, i, w, a, b: grouped_expert_ffn(x, i, w, a, b, backend="triton",
                                                           recompute_activation=recompute),
                 _cuda(*args), grad_out.cuda().bfloat16())
    want = _grads(lambda x, i, w, a, b: grouped_expert_ffn(x, i, w, a, b, backend="reference"),
                  _cuda(*args, dtype=torch.float32), grad_out.cuda().float())
    assert got[0].dtype == torch.bfloat16
    _assert_rows_close(got, want, f"grouped_expert_ffn {(n, h, f, e, k)} recompute={recompute}")
    skipped = (ids < 0).cuda()
    assert torch.all(got[2][skipped] == 0)  # dropped slots get no routing-weight gradient
    for x in empty:
        assert torch.all(got[3][x] == 0) and torch.all(got[4][x] == 0)


@pytest.mark.parametrize("t,h,f,e,k", [(1, 64, 48, 4, 2), (93, 328, 200, 6, 2)])
def test_moe_ffn_bf16_with_an_empty_expert(t, h, f, e, k):
    from megatron_jai.moe.functional import moe_ffn

    g = torch.Generator().manual_seed(t)
    logits = torch.randn(t, e, generator=g)
    logits[:, e - 1] = -30.0  # never chosen: an empty expert
    hidden, _, _, w_gate_up, w_down, grad_out = _expert_inputs(t, h, f, e, k, seed=t + 1)
    tensors = [hidden.bfloat16(), logits, w_gate_up.bfloat16(), w_down.bfloat16()]
    got = _grads(lambda x, lg, a, b: moe_ffn(x, lg, a, b, k, backend="triton"), _cuda(*tensors),
                 grad_out.cuda().bfloat16())
    want = _grads(lambda x, lg, a, b: moe_ffn(x, lg, a, b, k, backend="reference"),
                  _cuda(*tensors, dtype=torch.float32), grad_out.cuda().float())
    _assert_rows_close(got, want, f"moe_ffn {(t, h, f, e, k)}")
    assert torch.all(got[3][e - 1] == 0) and torch.all(got[4][e - 1] == 0)


def test_bit_reproducible_and_split_k(monkeypatch):
    """Two runs give identical bits (fixed configuration, no atomics); a forced split-K weight
    gradient (fp32 partial sums added in split order) is reproducible too and close to unsplit."""
    from megatron_jai.moe.functional import grouped_expert_ffn

    hidden, ids, weights, w_gate_up, w_down, grad_out = _expert_inputs(4099, 768, 512, 8, 2, seed=9, drop=0.05)
    args = _cuda(hidden, ids, weights, w_gate_up, w_down, dtype=torch.bfloat16)
    args[2] = weights.cuda()
    dout = grad_out.cuda().bfloat16()

    def run():
        return _grads(lambda x, i, w, a, b: grouped_expert_ffn(x, i, w, a, b, backend="triton"), args, dout)

    first, second = run(), run()
    assert all(torch.equal(a, b) for a, b in zip(first, second)), "not bit-reproducible"
    monkeypatch.setenv("JAI_MOE_WGRAD_SPLIT_K", "4")
    split_a, split_b = run(), run()
    assert all(torch.equal(a, b) for a, b in zip(split_a, split_b)), "split-K not bit-reproducible"
    _assert_rows_close(split_a, first, "split-K vs unsplit", tol=2e-2)


# ---- the MoE layer ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def megatron_single_rank():
    from megatron_jai import parallel

    parallel.initialize()
    yield
    parallel.destroy()


def _layers(capacity_factor, seed):
    """An fp32 MoE layer and its copy with bf16 experts (the router stays fp32 in both)."""
    from megatron.core.transformer.spec_utils import build_module

    from megatron_jai.presets import TINY_MOE
    from megatron_jai.moe.layer import moe_layer_spec

    cfg = TINY_MOE.replace(hidden_size=328, moe_ffn_hidden_size=200, num_experts=6, moe_top_k=2,
                           moe_capacity_factor=capacity_factor)
    torch.manual_seed(seed)
    layer = build_module(moe_layer_spec(cfg), config=cfg.transformer_config()).cuda()
    layer.set_layer_number(1)
    with torch.no_grad():
        layer.router.weight.normal_(0, 0.5)
        layer.experts.weight_gate_up.normal_(0, cfg.hidden_size ** -0.5)
        layer.experts.weight_down.normal_(0, cfg.expert_ffn_hidden_size ** -0.5)
        layer.experts.weight_gate_up.copy_(layer.experts.weight_gate_up.bfloat16())  # bf16 values
        layer.experts.weight_down.copy_(layer.experts.weight_down.bfloat16())
    bf16 = copy.deepcopy(layer)
    bf16.experts.to(torch.bfloat16)
    return cfg, layer.eval(), bf16.eval()


@pytest.mark.parametrize("seq,batch,capacity", [(1, 1, None), (37, 3, None), (41, 2, 1.0)])
def test_moe_layer_bf16(megatron_single_rank, monkeypatch, seq, batch, capacity):
    """The layer on bf16 Triton experts against the same layer in fp32 on the reference backend: output,
    input, router and expert gradients (capacity 1.0 drops slots: ids -1 reach the kernels)."""
    cfg, exact, bf16 = _layers(capacity, seed=seq)
    g = torch.Generator().manual_seed(seq + batch)
    x = torch.randn(seq, batch, cfg.hidden_size, generator=g).cuda().bfloat16()
    upstream = torch.randn(seq, batch, cfg.hidden_size, generator=g).cuda()

    def grads(layer, backend, dtype):
        monkeypatch.setenv("JAI_MOE_BACKEND", backend)
        layer.zero_grad(set_to_none=True)
        xx = x.to(dtype).clone().requires_grad_()
        out = layer(xx)[0]
        out.backward(upstream.to(dtype))
        return [out.detach(), xx.grad, layer.router.weight.grad, layer.experts.weight_gate_up.grad,
                layer.experts.weight_down.grad]

    want = grads(exact, "reference", torch.float32)
    got = grads(bf16, "triton", torch.bfloat16)
    assert got[0].dtype == torch.bfloat16
    _assert_rows_close([got[0], got[1], got[3], got[4]], [want[0], want[1], want[3], want[4]],
                       f"MoE layer {(seq, batch, capacity)}")
    # The router gradient flows through the routing weights only: compare it as a whole.
    rel = float((got[2] - want[2]).norm() / want[2].norm().clamp_min(1e-30))
    assert rel < ROW_TOL, f"router weight gradient: relative error {rel:.3e}"
    if capacity is not None:
        from megatron_jai.moe.layer import collect_router_stats

        assert collect_router_stats(bf16)["moe/dropped_fraction"] > 0


# ---- the CUDA routing op ---------------------------------------------------------------------

def test_cuda_routing_op_matches_the_cpp_op_bit_for_bit():
    from megatron_jai.kernels import routing

    ext = routing.load_extension()
    assert ext is not None, "megatron_jai.kernels._routing is not built"
    assert ext.has_cuda, "the routing op was built without CUDA (pip install --no-build-isolation --no-deps -e .)"
    g = torch.Generator().manual_seed(0)
    cases = [(0, 2, 4), (1, 1, 1), (1, 2, 4), (7, 2, 4), (2047, 1, 3), (2048, 2, 4), (8193, 6, 64),
             (100003, 2, 8), (1 << 20, 1, 16), (5000, 4, 1364), (4096, 2, 300)]
    for tokens, k, experts in cases:
        ids = torch.randint(-1, experts + 2, (tokens, k), generator=g)  # -1 and >= E: skipped
        for dtype in (torch.int64, torch.int32):
            want = ext.routing_metadata_cpu(ids.to(dtype), experts)
            got = ext.routing_metadata_cuda(ids.to(dtype).cuda(), experts)
            for name, a, b in zip(("tokens_per_expert", "sorted_slots", "slot_positions", "offsets"), got, want):
                assert a.is_cuda and a.dtype == torch.int64, name
                assert torch.equal(a.cpu(), b), f"{name} differs ({tokens} x {k} ids, {experts} experts, {dtype})"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the entry point warns when it falls back to the reference
        meta = routing.routing_metadata(torch.tensor([[2, 0], [-1, 2]], device="cuda"), 3)
    assert meta.sorted_slots.tolist() == [1, 0, 3, 2] and meta.offsets.tolist() == [0, 1, 1, 3]


# ---- training --------------------------------------------------------------------------------

def _pretrain(tmp_path, name, model, steps=40):
    metrics = tmp_path / f"{name}.jsonl"
    proc = run_cmd([sys.executable, os.path.join(REPO_ROOT, "pretrain_jai.py"), "--model", model,
                    "--train-iters", steps, "--log-interval", 10, "--metrics-file", metrics],
                   env={"JAI_MOE_BACKEND": "triton"}, timeout=600)
    records = [json.loads(line) for line in open(metrics)]
    losses = [r["loss"] for r in records]
    assert len(losses) == steps and all(math.isfinite(x) for x in losses), losses
    assert abs(losses[0] - math.log(1024)) < 0.5, losses[0]
    assert losses[-1] < 5.5, losses
    assert not any(r["skipped"] for r in records)
    assert "bf16" in proc.stdout, proc.stdout  # the GPU default
    return records


def test_pretrain_tiny_moe_on_triton(tmp_path):
    _pretrain(tmp_path, "tiny_moe", "tiny-moe")


def test_pretrain_tiny_moe_with_dus_skips(tmp_path):
    from megatron_jai.config import SkipConnection
    from megatron_jai.presets import TINY_MOE

    cfg = TINY_MOE.replace(name="tiny-moe-dus", skip_connections=(SkipConnection(0, 2), SkipConnection(1, 3)))
    path = tmp_path / "model_config.json"
    cfg.save(str(path))
    _pretrain(tmp_path, "tiny_moe_dus", str(path))
