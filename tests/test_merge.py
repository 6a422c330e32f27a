"""Checkpoint merging (``tools/merge_checkpoints.py``): the methods against plain-torch references
and against mergekit itself (its kernels on random tensors; its merges of our exports of a JAI, a
Mixtral and a Phi-3 model), mergekit's YAML, DARE's statistics, streaming memory, refusals, and
(under torchrun) inputs saved at TP=2 / PP=2 / EP=2, training from the merge and exporting it."""
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import REPO_ROOT, torchrun

from megatron_jai import cli
from megatron_jai.checkpoint.stream import CheckpointReader, CheckpointWriter
from megatron_jai.presets import TINY_MOE

TOOL = os.path.join(REPO_ROOT, "tools", "merge_checkpoints.py")
CFG = TINY_MOE.replace(name="tiny-moe-merge", num_layers=2)
_spec = importlib.util.spec_from_file_location("merge_tool", TOOL)
merge_tool = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(merge_tool)


def _rewrite(src, dst, fn, cfg=None):
    """A checkpoint with the tensors of ``src`` passed through ``fn(key, tensor)``."""
    r = CheckpointReader(str(src))
    with CheckpointWriter(str(dst), cfg or r.config) as w:
        for key in r.keys():
            if r.is_stacked(key):
                for i in range(r.shape(key)[0]):
                    w.write_layer(key, i, r.shape(key)[0], fn(key, r.read_layer(key, i)))
            else:
                w.write(key, fn(key, r.read(key)))
    return str(dst)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """Three random MoE checkpoints: a (saved by save_checkpoint), b and base (same tensors, other
    values); a and b carry the same tokenizer/."""
    from megatron_jai import parallel
    from megatron_jai.checkpoint.dist import save_checkpoint
    from megatron_jai.model import build_model

    parallel.initialize(1, 1, seed=5)
    d = tmp_path_factory.mktemp("merge")
    roots = {"a": str(d / "a")}
    save_checkpoint(roots["a"], [build_model(CFG)], CFG, iteration=7)
    parallel.destroy()
    gen = torch.Generator().manual_seed(1)
    for name in ("b", "base"):
        roots[name] = _rewrite(roots["a"], d / name, lambda k, t: torch.randn(t.shape, generator=gen) * 0.02)
    for name in ("a", "b"):
        os.makedirs(os.path.join(roots[name], "tokenizer"))
        with open(os.path.join(roots[name], "tokenizer", "tokenizer.model"), "wb") as f:
            f.write(b"the same tokenizer")
    return roots


def merge(capsys, *args, rc=0):
    """The tool in-process; returns (stdout, stderr)."""
    capsys.readouterr()
    got = cli.run("merge_checkpoints.py", merge_tool.main, [str(a) for a in args] + ["--no-progress"])
    out, err = capsys.readouterr()
    assert got == rc, f"merge_checkpoints.py {args} returned {got}\n{out}\n{err}"
    return out, err


def units(reader, key, hf_format="auto"):
    """The tensors of the Hugging Face model that one Megatron tensor holds, layer by layer (q, k
    and v apart; a Mixtral layer's experts fused, as transformers holds them; apart in the JAI
    layout)."""
    from megatron_jai.checkpoint.merge import merge_units

    row = merge_units(reader.config, hf_format).get(key)
    layers = ([reader.read_layer(key, i) for i in range(reader.shape(key)[0])]
              if reader.is_stacked(key) else [reader.read(key)])
    out = []
    for x in layers:
        parts = row.to_hf(reader.config, x) if row else x
        out += list(parts) if isinstance(parts, tuple) else [parts]
    return out


def assert_units(out, readers, reference, hf_format="auto", **tol):
    out = CheckpointReader(str(out))
    assert sorted(out.keys()) == sorted(readers[0].keys())
    for key in readers[0].keys():
        for got, *xs in zip(units(out, key, hf_format), *(units(r, key, hf_format) for r in readers)):
            expected = reference(*xs)
            if tol:
                torch.testing.assert_close(got.double(), expected.double(), **tol)
            else:
                assert got.dtype == expected.dtype and torch.equal(got, expected), key


def test_linear_1to1_is_the_elementwise_mean_bit_for_bit(ckpts, tmp_path, capsys):
    a, b = CheckpointReader(ckpts["a"]), CheckpointReader(ckpts["b"])
    out = tmp_path / "m"
    stdout, _ = merge(capsys, "--inputs", ckpts["a"], ckpts["b"], "--out", out)
    line = stdout.strip().splitlines()[-1]
    assert line.startswith("merge linear: 2 inputs, ") and "peak RSS" in line
    m = CheckpointReader(str(out))
    assert {"decoder.layers.mlp.experts.weight_gate_up", "decoder.layers.mlp.experts.weight_down",
            "decoder.layers.mlp.router.weight"} <= set(m.keys())
    for key in a.keys():
        mean = torch.stack([a.read(key), b.read(key)]).mean(0)
        assert torch.equal(m.read(key).view(torch.int32), mean.view(torch.int32)), key
    # an ordinary model-only checkpoint root: tracker, iteration 0, config, the tokenizer
    assert sorted(os.listdir(out)) == ["iter_0000000", "latest_checkpointed_iteration.txt",
                                       "merge.json", "model_config.json", "tokenizer"]
    assert m.iteration == 0 and m.config == CFG
    assert m.common == {"jai_manifest": "jai_manifest.json"}  # only the manifest's mark
    assert sorted(m.object_keys()) == sorted(a.object_keys())
    assert (out / "tokenizer" / "tokenizer.model").read_bytes() == b"the same tokenizer"
    record = json.loads((out / "merge.json").read_text())
    assert record["method"] == "linear" and record["parameters"] == {} and record["format"] == "mixtral"
    assert [i["iteration"] for i in record["inputs"]] == [7, 0]

    # weights (normalised by default, or not), an iteration directory as input, bf16 output
    w = tmp_path / "w"
    merge(capsys, "--inputs", os.path.join(ckpts["a"], "iter_0000007"), ckpts["b"], "--weights", 3, 1,
          "--dtype", "bf16", "--out", w)
    assert_units(w, [a, b], lambda x, y: ((3 * x + y) / 4).bfloat16())
    # bf16 inputs: computed in fp32, written in bf16
    halves = [_rewrite(ckpts[n], tmp_path / f"{n}16", lambda k, t: t.bfloat16()) for n in ("a", "b")]
    merge(capsys, "--inputs", *halves, "--out", tmp_path / "m16")
    assert_units(tmp_path / "m16", [CheckpointReader(h) for h in halves],
                 lambda x, y: ((x.float() + y.float()) / 2).bfloat16())
    raw = tmp_path / "raw"
    merge(capsys, "--inputs", ckpts["a"], ckpts["b"], "--weights", 0.5, 0.25, "--no-normalize",
          "--out", raw)
    assert_units(raw, [a, b], lambda x, y: 0.5 * x + 0.25 * y, rtol=1e-6, atol=1e-7)


def _slerp_reference(x, y, t):
    x64, y64 = x.double(), y.double()
    cos = torch.dot(x64.flatten() / x64.norm(), y64.flatten() / y64.norm()).item()
    if abs(cos) > 0.9995:
        return (1 - t) * x64 + t * y64
    theta = math.acos(cos)
    return (math.sin((1 - t) * theta) * x64 + math.sin(t * theta) * y64) / math.sin(theta)


def test_slerp_endpoints_and_interpolation(ckpts, tmp_path, capsys):
    a, b = CheckpointReader(ckpts["a"]), CheckpointReader(ckpts["b"])
    for t, endpoint in ((0, a), (1, b)):
        out = tmp_path / f"t{t}"
        merge(capsys, "--method", "slerp", "--inputs", ckpts["a"], ckpts["b"], "--t", t, "--out", out)
        assert_units(out, [endpoint], lambda x: x)
    mid = tmp_path / "t03"
    merge(capsys, "--method", "slerp", "--inputs", ckpts["a"], ckpts["b"], "--t", 0.3, "--out", mid)
    assert_units(mid, [a, b], lambda x, y: _slerp_reference(x, y, 0.3), rtol=1e-5, atol=1e-6)
    # a nearly colinear pair interpolates linearly: a and 2a
    double = _rewrite(ckpts["a"], tmp_path / "double", lambda k, t: 2 * t)
    lin = tmp_path / "lin"
    merge(capsys, "--method", "slerp", "--inputs", ckpts["a"], double, "--t", 0.25, "--out", lin)
    assert_units(lin, [a], lambda x: 1.25 * x, rtol=1e-6, atol=1e-7)


def _ties_reference(base, xs, weights, density, lam):
    """TIES as written in the paper, on whole tensors: top-k trim, sign of the sum, disjoint mean."""
    deltas = []
    for x, w in zip(xs, weights):
        d = (x - base).double()  # the delta as the merge sees it (fp32), then exact arithmetic
        keep = torch.zeros(d.numel(), dtype=torch.bool)
        keep[d.abs().flatten().topk(max(1, int(density * d.numel()))).indices] = True
        deltas.append(d * keep.view_as(d) * w)
    stacked = torch.stack(deltas)
    elected = torch.where(stacked.sum(0) >= 0, 1.0, -1.0).double()
    agree = stacked.sign() == elected
    w = torch.tensor(weights, dtype=torch.float64).view(-1, *[1] * base.dim())
    divisor = (w * agree).sum(0)
    divisor[divisor == 0] = 1
    return base.double() + lam * (stacked * agree).sum(0) / divisor


def test_task_arithmetic_and_ties(ckpts, tmp_path, capsys):
    a, b, base = (CheckpointReader(ckpts[n]) for n in ("a", "b", "base"))
    ta = tmp_path / "ta"
    merge(capsys, "--method", "task_arithmetic", "--base", ckpts["base"], "--inputs", ckpts["a"],
          ckpts["b"], "--weights", 0.7, 0.5, "--lambda", 0.8, "--out", ta)
    assert_units(ta, [a, b, base], lambda x, y, z: z + 0.8 * (0.7 * (x - z) + 0.5 * (y - z)),
                 rtol=1e-5, atol=1e-6)
    ties = tmp_path / "ties"
    merge(capsys, "--method", "ties", "--base", ckpts["base"], "--inputs", ckpts["a"], ckpts["b"],
          "--weights", 1, 0.5, "--density", 0.4, "--lambda", 1.1, "--out", ties)
    assert_units(ties, [a, b, base],
                 lambda x, y, z: _ties_reference(z, [x, y], [1, 0.5], 0.4, 1.1), rtol=1e-5, atol=1e-6)
    # per tensor of the JAI layout: each expert's w1, w3 and w2 apart
    merge(capsys, "--method", "ties", "--base", ckpts["base"], "--inputs", ckpts["a"], ckpts["b"],
          "--density", 0.4, "--format", "jai", "--out", tmp_path / "ties_jai")
    assert_units(tmp_path / "ties_jai", [a, b, base],
                 lambda x, y, z: _ties_reference(z, [x, y], [1, 1], 0.4, 1), "jai", rtol=1e-5, atol=1e-6)
    assert len(units(a, "decoder.layers.mlp.experts.weight_gate_up", "jai")) == 2 * 4 * 2

    # over identical models, ties gives that model: exactly when it is also the base, and up to
    # fp32 rounding of base + (model - base) otherwise
    same = tmp_path / "same"
    merge(capsys, "--method", "ties", "--base", ckpts["a"], "--inputs", ckpts["a"], ckpts["a"],
          ckpts["a"], "--density", 0.3, "--out", same)
    assert_units(same, [a], lambda x: x)
    twins = tmp_path / "twins"
    merge(capsys, "--method", "ties", "--base", ckpts["base"], "--inputs", ckpts["a"], ckpts["a"],
          "--out", twins)
    assert_units(twins, [a], lambda x: x, rtol=0, atol=1e-7)


def test_ties_sign_election_and_exact_k_by_hand():
    from megatron_jai.checkpoint.merge import sparsify, task_vectors

    base = torch.zeros(4)
    x1, x2 = torch.tensor([1.0, -2.0, 3.0, 0.0]), torch.tensor([-3.0, 1.0, 1.0, 0.0])
    # sums -2, -1, 4, 0 elect -, -, +, +: entry 0 keeps only x2, entry 1 only x1, entry 2 both
    assert torch.equal(task_vectors(base, [x1, x2], [1.0, 1.0], consensus=True, normalize=True),
                       torch.tensor([-3.0, -2.0, 2.0, 0.0]))
    assert torch.equal(sparsify(torch.tensor([0.1, -0.5, 0.3, -0.05]), "magnitude", 0.5),
                       torch.tensor([0.0, -0.5, 0.3, 0.0]))
    # exactly k = 5 of 8 kept although 6 magnitudes reach the threshold
    kept = sparsify(torch.tensor([1.0, -2, 2, 1, -2, 2, 2, 3]), "magnitude", 5 / 8)
    assert int((kept != 0).sum()) == 5 and kept[7] == 3 and (kept[[0, 3]] == 0).all()


def _with_ties(shape, gen):
    """Random values on a coarse grid: many equal magnitudes at every threshold."""
    return torch.randint(-6, 7, shape, generator=gen).float() / 64


@pytest.mark.parametrize("shape", [(37, 53), (3, 16, 24), (1000,)])
def test_kernels_equal_mergekit(shape):
    """Each method on one tensor equals mergekit's (0.1.5) own kernel: exactly for the task-vector
    family and model_stock, ties broken in the same order, with and without equal magnitudes."""
    from mergekit.merge_methods import registry
    from mergekit.merge_methods.base import TensorGroup
    from mergekit.sparsify import magnitude, magnitude_outliers

    from megatron_jai.checkpoint.merge import METHODS, linear, model_stock, slerp, sparsify, task_vectors

    gen = torch.Generator().manual_seed(sum(shape))
    base = torch.randn(shape, generator=gen) * 0.1
    for draw in (lambda: torch.randn(shape, generator=gen) * 0.01, lambda: _with_ties(shape, gen)):
        deltas = [draw() for _ in range(3)]
        for density, gamma in ((0.3, 0.01), (0.55, 0.2), (0.9, 0.15)):
            d = deltas[0]
            assert torch.equal(sparsify(d.clone(), "magnitude", density), magnitude(d, density))
            assert torch.equal(sparsify(d.clone(), "magnitude_outliers", density, gamma=gamma),
                               magnitude_outliers(d, density, gamma=gamma))
        xs = [base + d for d in deltas]
        group = TensorGroup.from_tensors([base, *xs], base_index=0)
        weights, densities = [1.0, 0.5, -0.3], [0.4, 0.7, 0.3]
        for name in ("task_arithmetic", "ties", "breadcrumbs", "breadcrumbs_ties"):
            m = METHODS[name]
            for normalize, rescale in ((m.shared["normalize"], False), (True, True)):
                theirs, = registry.get(name)([group], parameters={
                    "weight": dict(enumerate(weights, 1)), "density": dict(enumerate(densities, 1)),
                    "normalize": normalize, "rescale": rescale, "lambda": 0.9,
                    **({"gamma": {1: 0.05, 2: 0.01, 3: 0.1}} if "gamma" in m.per_model else {})})
                ours = task_vectors(base, xs, weights, densities=densities, sparsify_method=m.sparsify,
                                    consensus=m.consensus, normalize=normalize, rescale=rescale,
                                    lam=0.9, gammas=[0.05, 0.01, 0.1])
                torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-7 if rescale else 0,
                                           msg=f"{name} normalize={normalize} rescale={rescale}")
        for filter_wise in (False, True):
            theirs, = registry.get("model_stock")([group], parameters={"filter_wise": filter_wise})
            torch.testing.assert_close(model_stock(base, xs, filter_wise), theirs, rtol=0, atol=1e-7)
        pair = TensorGroup.from_tensors(xs[:2], base_index=0)
        theirs, = registry.get("slerp")([pair], parameters={"t": 0.3})
        torch.testing.assert_close(slerp(xs[0], xs[1], 0.3), theirs, rtol=0, atol=1e-6)
        theirs, = registry.get("linear")([pair], parameters={"weight": {0: 0.3, 1: 0.9}})
        torch.testing.assert_close(linear(xs[:2], [0.3, 0.9]), theirs, rtol=0, atol=1e-7)


def test_heavy_ties_in_16_bits_equal_mergekit():
    """bf16 inputs (sorted at once, in place; the magnitudes made twice; the inputs' task vectors
    in threads) on tensors large enough for torch's sort to order equal values its own way:
    ties, breadcrumbs_ties and the sparsification alone equal mergekit's kernels on the same
    values in fp32, where a third of the magnitudes or more sit at the threshold."""
    from mergekit.merge_methods import registry
    from mergekit.merge_methods.base import TensorGroup
    from mergekit.sparsify import magnitude, magnitude_outliers

    from megatron_jai.checkpoint.merge import sparsify, task_vectors

    gen = torch.Generator().manual_seed(11)
    shape = (384, 640)
    base = (torch.randn(shape, generator=gen) * 0.02).bfloat16()
    xs = [(base.float() + torch.randint(-2, 3, shape, generator=gen) * 2.0 ** -12).bfloat16()
          for _ in range(2)]
    d = xs[0].float() - base.float()
    tied = (d.abs() == d.abs().flatten().kthvalue(d.numel() // 2).values).float().mean().item()
    assert tied > 0.3, tied  # the threshold cuts through a block of equal magnitudes
    for density, gamma in ((0.5, 0.01), (0.7, 0.1)):
        assert torch.equal(sparsify(d.clone(), "magnitude", density, ties_likely=True),
                           magnitude(d, density))
        assert torch.equal(sparsify(d.clone(), "magnitude_outliers", density, gamma=gamma,
                                    ties_likely=True), magnitude_outliers(d, density, gamma=gamma))
    group = TensorGroup.from_tensors([base.float(), *(x.float() for x in xs)], base_index=0)
    for name, method, gammas in (("ties", "magnitude", None),
                                 ("breadcrumbs_ties", "magnitude_outliers", [0.02, 0.05])):
        for rescale in (False, True):
            theirs, = registry.get(name)([group], parameters={
                "weight": {1: 1.0, 2: 0.6}, "density": {1: 0.5, 2: 0.45}, "normalize": True,
                "rescale": rescale, "lambda": 1.0,
                **({"gamma": dict(enumerate(gammas, 1))} if gammas else {})})
            for workers in (1, 2):
                ours = task_vectors(base, xs, [1.0, 0.6], densities=[0.5, 0.45],
                                    sparsify_method=method, consensus=True, normalize=True,
                                    rescale=rescale, gammas=gammas, workers=workers)
                assert ours.dtype == torch.float32
                torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-7 if rescale else 0,
                                           msg=f"{name} rescale={rescale} workers={workers}")


def test_work_ahead_keeps_the_order_and_the_byte_budget():
    """Items come back in order; they run at once only while their bytes fit the budget (the
    largest alone), and an error reaches the caller."""
    import threading
    import time

    from megatron_jai.checkpoint.merge import _Ahead

    costs = {"big": 10, "a": 3, "b": 3, "c": 3, "d": 4, "big2": 10, "e": 1}
    lock, running, seen = threading.Lock(), [], []

    def compute(item):
        with lock:
            running.append(item)
            seen.append(sum(costs.get(i, 1) for i in running))
        time.sleep(0.02)
        with lock:
            running.remove(item)
        if item == "boom":
            raise ValueError("boom")
        return item.upper()

    ahead = _Ahead(list(costs), compute, costs.get, 10, workers=3)
    try:
        assert [ahead.take(item) for item in costs] == [i.upper() for i in costs]
    finally:
        ahead.close()
    assert max(seen) <= 10 and len(seen) == len(costs)
    ahead = _Ahead(["a", "boom", "b"], compute, lambda i: 1, 10, workers=2)
    try:
        assert ahead.take("a") == "A"
        with pytest.raises(ValueError, match="boom"):
            ahead.take("boom")
    finally:
        ahead.close()


def test_dare_keeps_a_density_share_and_rescales_the_l1_norm():
    from megatron_jai.checkpoint.merge import sparsify

    delta = torch.randn(400, 500, generator=torch.Generator().manual_seed(0))
    for density in (0.1, 0.5, 0.9):
        for rescale in (True, False):
            out = sparsify(delta.clone(), "random", density, rescale,
                           generator=torch.Generator().manual_seed(3))
            kept = out != 0
            share = kept.float().mean().item()
            assert abs(share - density) < 4 * math.sqrt(density * (1 - density) / delta.numel())
            scale = out[kept] / delta[kept]
            expected = delta.abs().sum() / delta[kept].abs().sum() if rescale else torch.tensor(1.0)
            torch.testing.assert_close(scale, expected.expand_as(scale), rtol=1e-5, atol=0)
            again = sparsify(delta.clone(), "random", density, rescale,
                             generator=torch.Generator().manual_seed(3))
            assert torch.equal(out, again)


# ---- mergekit itself, on exports of a JAI (skips + experts), a Mixtral and a Phi-3 model ---------
MERGEKIT_CONFIGS = {  # mergekit YAML; A, B, BASE stand for the models
    "linear": {"models": [{"model": "A", "parameters": {"weight": 0.7}},
                          {"model": "B", "parameters": {"weight": 0.4}}]},
    "slerp": {"base_model": "A", "models": [{"model": "A"}, {"model": "B"}], "parameters": {"t": [
        {"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]}, {"filter": "mlp", "value": [1, 0.2]},
        {"value": 0.45}]}},
    "task_arithmetic": {"base_model": "BASE", "parameters": {"lambda": 0.9},
                        "models": [{"model": "A", "parameters": {"weight": 0.6}},
                                   {"model": "B", "parameters": {"weight": 0.5}}]},
    "ties": {"base_model": "BASE", "models": [
        {"model": "A", "parameters": {"weight": 1.0, "density": 0.4}},
        {"model": "B", "parameters": {"weight": 0.5, "density": [0.3, 0.8]}}]},
    "breadcrumbs": {"base_model": "BASE", "parameters": {"density": 0.5}, "models": [
        {"model": "A", "parameters": {"weight": 1.0, "density": 0.6, "gamma": 0.05}},
        {"model": "B", "parameters": {"weight": 0.5}}]},
    "breadcrumbs_ties": {"base_model": "BASE", "parameters": {"normalize": True, "density": 0.5},
                         "models": [{"model": "A", "parameters": {"weight": 1.0, "gamma": 0.05}},
                                    {"model": "B", "parameters": {"weight": 0.5}}]},
    "model_stock": {"base_model": "BASE", "models": [{"model": "A"}, {"model": "B"}]},
}


def _config(tmp, method, paths, **extra):
    """A mergekit config file with the models' paths filled in."""
    import yaml

    text = json.dumps({**MERGEKIT_CONFIGS.get(method, {}), **extra, "merge_method": method,
                       "dtype": "float32"})
    for name, path in paths.items():
        text = text.replace(f'"{name}"', json.dumps(str(path)))
    path = tmp / f"{method}-{abs(hash(text))}.yml"
    path.write_text(yaml.safe_dump(json.loads(text)))
    return path


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    """Per layout: base, a and b Megatron checkpoints and their exports. Values lie on a coarse
    grid, so that magnitudes tie at every threshold; the padding rows are large and differ."""
    from export_helpers import JAI, save_hf_model, tiny_tokenizer

    from megatron_jai.checkpoint.convert import hf_to_mcore
    from megatron_jai.hf.export import mcore_to_hf

    root = tmp_path_factory.mktemp("mergekit")
    tok = tiny_tokenizer(str(root / "tok"))
    layouts = {"jai": JAI, "mixtral": JAI.replace(name="tiny-mixtral", skip_connections=()),
               "phi3": JAI.replace(name="tiny-phi3", skip_connections=(), num_experts=0)}
    out = {}
    for layout, cfg in layouts.items():
        d = root / layout
        save_hf_model(cfg, d / "hf0", seed=3)
        hf_to_mcore(str(d / "hf0"), str(d / "raw"), progress=False)
        gen = torch.Generator().manual_seed(7)

        def grid(key, t, delta):
            t = torch.round(t * 64) / 64 + (_with_ties(t.shape, gen) / 4 if delta else 0)
            if key in ("embedding.word_embeddings.weight", "output_layer.weight"):
                t[cfg.vocab_size:] = torch.randn(t[cfg.vocab_size:].shape, generator=gen) * 5
            return t

        out[layout] = {}
        for name, delta in (("BASE", False), ("A", True), ("B", True)):
            _rewrite(d / "raw", d / name, lambda k, t: grid(k, t, delta))
            mcore_to_hf(str(d / name), str(d / f"{name}_hf"), progress=False, tokenizer=tok)
            out[layout][name] = d / name
        assert CheckpointReader(str(d / "A")).config.padded_vocab_size > cfg.vocab_size
    return root, tok, out


def _hf_tensors(path):
    """The model's tensors as transformers holds them (Mixtral's experts fused)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, trust_remote_code=True)
    return model.state_dict()


def test_deterministic_methods_equal_mergekit_on_exports(families, tmp_path, capsys):
    """mergekit's merge of the exports == our merge of the checkpoints, exported (within 1e-6),
    from the same YAML (per-model weights and densities, a density gradient, t filters)."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    from megatron_jai.hf.export import mcore_to_hf

    root, tok, layouts = families
    for layout, ckpts in layouts.items():
        for method in MERGEKIT_CONFIGS:
            ours, hf, theirs = (tmp_path / f"{layout}-{method}-{s}" for s in ("ours", "hf", "mk"))
            merge(capsys, "--config", _config(tmp_path, method, ckpts), "--out", ours)
            mcore_to_hf(str(ours), str(hf), progress=False, tokenizer=tok)
            exports = {name: path.parent / f"{name}_hf" for name, path in ckpts.items()}
            import yaml
            config = yaml.safe_load(_config(tmp_path, method, exports).read_text())
            run_merge(MergeConfiguration.model_validate(config), str(theirs),
                      options=MergeOptions(trust_remote_code=True, copy_tokenizer=False, quiet=True))
            for name in ("configuration_jai.py", "modeling_jai.py"):  # mergekit writes no code
                if (hf / name).exists():
                    shutil.copy(hf / name, theirs / name)
            got, expected = _hf_tensors(hf), _hf_tensors(theirs)
            assert sorted(got) == sorted(expected), (layout, method)
            for key in got:
                diff = (got[key] - expected[key]).abs().max().item()
                assert diff <= 1e-6, (layout, method, key, diff)
            a, m = CheckpointReader(str(ckpts["A"])), CheckpointReader(str(ours))
            vocab = a.config.vocab_size
            for key in ("embedding.word_embeddings.weight", "output_layer.weight"):
                assert torch.equal(m.read(key)[vocab:], a.read(key)[vocab:]), (layout, method, key)


def test_dare_on_checkpoints_keeps_its_share_and_seed(families, tmp_path, capsys):
    """DARE through the YAML: the share of task-vector entries kept is the density, the kept ones
    are rescaled by one factor per tensor (the L1 ratio); the seed fixes the result."""
    _, _, layouts = families
    ckpts = layouts["jai"]
    one = {"base_model": "BASE", "models": [{"model": "A", "parameters": {"weight": 1.0, "density": 0.3}}]}
    runs = {}
    for method, seed in (("dare_linear", 1), ("dare_ties", 1), ("dare_linear", 2)):
        runs[method, seed] = tmp_path / f"{method}{seed}"
        merge(capsys, "--config", _config(tmp_path, method, ckpts, **one), "--seed", seed,
              "--out", runs[method, seed])
    first = CheckpointReader(str(runs["dare_linear", 1]))
    assert json.loads((runs["dare_linear", 1] / "merge.json").read_text())["seed"] == 1
    a, base = CheckpointReader(str(ckpts["A"])), CheckpointReader(str(ckpts["BASE"]))
    kept = total = 0
    for key in first.keys():
        for got, x, b in zip(units(first, key), units(a, key), units(base, key)):
            delta, merged = x - b, got - b
            live = delta != 0
            keep = live & (merged.abs() > 1e-9)
            kept, total = kept + int(keep.sum()), total + int(live.sum())
            if keep.any():
                ratio = merged[keep] / delta[keep]
                expected = delta.abs().sum() / delta[keep].abs().sum()
                torch.testing.assert_close(ratio, expected.expand_as(ratio), rtol=1e-4, atol=0)
        # with one input the sign election keeps everything: dare_ties == dare_linear, same seed
        ties = CheckpointReader(str(runs["dare_ties", 1]))
        assert torch.equal(ties.read(key), first.read(key)), key
    assert abs(kept / total - 0.3) < 0.02, kept / total
    other = CheckpointReader(str(runs["dare_linear", 2]))
    assert not torch.equal(other.read("decoder.layers.mlp.experts.weight_gate_up"),
                           first.read("decoder.layers.mlp.experts.weight_gate_up"))


def test_threads_do_not_change_the_result(ckpts, tmp_path, capsys):
    """One tensor at a time or read, merged and written by 3 threads: the same checkpoint."""
    for method, extra in (("dare_ties", ["--density", 0.4, "--seed", 3]),
                          ("breadcrumbs_ties", ["--density", 0.6]), ("model_stock", [])):
        outs = []
        for workers in (1, 3):
            path = tmp_path / f"{method}{workers}"
            merge(capsys, "--method", method, "--base", ckpts["base"], "--inputs", ckpts["a"],
                  ckpts["b"], *extra, "--workers", workers, "--out", path)
            outs.append(CheckpointReader(str(path)))
        for key in outs[0].keys():
            assert torch.equal(outs[0].read(key), outs[1].read(key)), (method, key)


def test_streaming_holds_a_few_tensors(tmp_path):
    """A 24-layer model of 97 equal-sized tensors: the merge holds a handful of them at once."""
    from megatron_jai.checkpoint.merge import merge_checkpoints

    gen = torch.Generator().manual_seed(0)
    roots = [str(tmp_path / f"in{n}") for n in range(3)]
    for root in roots:
        with CheckpointWriter(root, CFG.replace(num_layers=24, vocab_size=128)) as w:
            w.write("embedding.word_embeddings.weight", torch.randn(128, 64, generator=gen))
            for key in [f"decoder.layers.t{i}.weight" for i in range(4)]:
                for i in range(24):
                    w.write_layer(key, i, 24, torch.randn(128, 64, generator=gen))
    largest = 128 * 64 * 4
    for method, kw in (("linear", {}), ("ties", dict(base=roots[2], parameters={"density": 0.5}))):
        s = merge_checkpoints(method, roots[:2], str(tmp_path / method), progress=False,
                              measure=True, **kw)
        assert s["largest_tensor_bytes"] == largest and s["bytes"] > 97 * largest
        # each input's tensor, the output, the fp32 working set (ties: trimmed deltas, sign, mask)
        assert s["held_peak_bytes"] <= (6 if method == "linear" else 14) * largest, \
            (method, s["held_peak_bytes"] / largest)


def _copy_with_config(src, dst, **changes):
    shutil.copytree(src, dst)
    path = os.path.join(dst, "model_config.json")
    with open(path) as f:
        cfg = json.load(f)
    cfg.update(changes)
    with open(path, "w") as f:
        json.dump(cfg, f)
    return str(dst)


def test_refusals_are_one_line_and_write_nothing(ckpts, tmp_path, capsys):
    a, b, base = ckpts["a"], ckpts["b"], ckpts["base"]
    deeper = _copy_with_config(a, tmp_path / "deeper", num_layers=3)
    rope = _copy_with_config(a, tmp_path / "rope", rotary_base=40000.0)
    other_tok = _copy_with_config(b, tmp_path / "other_tok")
    with open(os.path.join(other_tok, "tokenizer", "tokenizer.model"), "wb") as f:
        f.write(b"another tokenizer")
    not_ckpt = tmp_path / "empty"
    not_ckpt.mkdir()
    never = tmp_path / "never"
    cases = [
        (["--inputs", a, deeper], "different architecture than input 1"),
        (["--inputs", a, rope], "rotary_base 10000.0 vs 40000.0"),
        (["--inputs", a, other_tok], "has a different tokenizer than input 1"),
        (["--method", "slerp", "--inputs", a, b, base], "slerp merges exactly 2 models, got 3"),
        (["--method", "slerp", "--inputs", a, b, "--t", 1.5], "t must be in [0, 1], got 1.5"),
        (["--method", "slerp", "--inputs", a, b, "--weights", 1, 2], "no per-model parameter 'weight'"),
        (["--method", "ties", "--inputs", a, b], "ties needs a base model"),
        (["--method", "task_arithmetic", "--inputs", a], "needs a base model"),
        (["--method", "model_stock", "--base", base, "--inputs", a], "at least 2 input models"),
        (["--method", "ties", "--base", base, "--inputs", a, "--density", 1.5], "density must be"),
        (["--inputs", a, b, "--weights", 1, 2, 3], "3 weights for 2 inputs"),
        (["--inputs", a, b, "--t", 0.5], "linear has no parameter 't'"),
        (["--inputs", a, b, "--base", base], "linear takes no base model"),
        (["--inputs", a, b, "--config", "x.yml"], "drop --inputs"),
        (["--inputs", a, str(tmp_path / "missing")], "does not exist"),
        (["--inputs", a, not_ckpt], "is not a checkpoint"),
        (["--inputs", a, b, "--out", a, "--force"], "must not be an input's checkpoint root"),
    ]
    for args, message in cases:
        _, err = merge(capsys, "--out", never, *args, rc=2)
        assert len(err.strip().splitlines()) == 1 and message in err, (args, err)
        assert not never.exists()
    out = tmp_path / "out"
    merge(capsys, "--inputs", a, b, "--out", out)
    _, err = merge(capsys, "--inputs", a, b, "--out", out, rc=2)
    assert "already exists (use --force" in err
    # training-only settings may differ: accepted
    # (and a tokenizer is compared file by file where both have the file)
    coeff = _copy_with_config(b, tmp_path / "coeff", moe_aux_loss_coeff=0.5, name="other")
    with open(os.path.join(coeff, "tokenizer", "vocab_map.json"), "w") as f:
        f.write("{}")
    merge(capsys, "--inputs", a, coeff, "--out", tmp_path / "coeff_merge")

    # --force replaces only a complete new output: a failure half-way keeps the old one
    before = sorted(os.listdir(out)), (out / "merge.json").read_text()
    broken = shutil.copytree(b, tmp_path / "broken")
    data = os.path.join(broken, "iter_0000000", "__0_0.distcp")
    with open(data, "r+b") as f:
        f.truncate(os.path.getsize(data) // 2)
    _, err = merge(capsys, "--inputs", a, broken, "--out", out, "--force", rc=2)
    assert "truncated" in err and len(err.strip().splitlines()) == 1
    assert (sorted(os.listdir(out)), (out / "merge.json").read_text()) == before
    merge(capsys, "--method", "slerp", "--inputs", a, b, "--out", out, "--force")
    assert json.loads((out / "merge.json").read_text())["method"] == "slerp"
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")], "temporary output left"

    # the real command line: one line on stderr, exit status 2, no traceback
    proc = subprocess.run([sys.executable, TOOL, "--inputs", a, deeper, "--out", tmp_path / "x"],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": REPO_ROOT})
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("merge_checkpoints.py: error: input 2 ("), proc.stderr


def test_config_refusals_are_one_line(ckpts, tmp_path, capsys):
    """What mergekit's YAML can say and we do not do, or says wrongly: one line each, nothing
    written."""
    import yaml

    a, b, base = ckpts["a"], ckpts["b"], ckpts["base"]
    two = [{"model": a}, {"model": b}]
    full = {"sources": [{"model": a, "layer_range": [0, 2]}, {"model": b, "layer_range": [0, 2]}]}
    cases = [
        ({"merge_method": "della", "base_model": base, "models": two}, "merge_method 'della' is not supported"),
        ({"merge_method": "ties", "models": two}, "ties needs a base model"),
        ({"merge_method": "ties", "base_model": base, "models": two, "parameters": {"epsilon": 0.1}},
         "ties has no parameter 'epsilon'"),
        ({"merge_method": "ties", "base_model": base, "models": [{"model": a, "parameters": {"lambda": 2}},
                                                                 {"model": b}]},
         "lambda is a parameter of the whole ties merge"),
        ({"merge_method": "ties", "base_model": base, "models": two, "parameters": {"density": "half"}},
         "density must be a value, a gradient"),
        ({"merge_method": "ties", "base_model": base, "models": two,
          "parameters": {"density": [{"filter": "mlp", "valu": 0.3}]}}, "{filter: ..., value: ...}"),
        ({"merge_method": "ties", "base_model": base, "models": two, "parameters": {"normalize": [1, 0]}},
         "normalize must be true or false"),
        ({"merge_method": "slerp", "models": two, "parameters": {"t": 0.3}}, "slerp needs a base_model"),
        ({"merge_method": "linear", "slices": [full, full]}, "several slices"),
        ({"merge_method": "linear", "slices": [{"sources": [{"model": a, "layer_range": [0, 1]},
                                                            {"model": b, "layer_range": [1, 2]}]}]},
         "slices of layers are not supported"),
        ({"merge_method": "linear", "modules": {}}, "modules (multi-module models) are not supported"),
        ({"merge_method": "linear", "models": two, "tokenizer": {"source": "union"}}, "tokenizer: "),
        ({"merge_method": "linear", "models": two, "dtype": "int8"}, "dtype 'int8' is not supported"),
        ({"merge_method": "linear", "models": two, "name": "x"}, "unknown key 'name'"),
        ({"merge_method": "linear", "models": two, "base_model": base}, "linear takes no base_model"),
        ({"merge_method": "linear", "models": two, "parameters": {"weight": 0}}, "weights sum to 0"),
    ]
    never = tmp_path / "never"
    for i, (config, message) in enumerate(cases):
        path = tmp_path / f"c{i}.yml"
        path.write_text(yaml.safe_dump(config))
        _, err = merge(capsys, "--config", path, "--out", never, rc=2)
        assert len(err.strip().splitlines()) == 1 and message in err, (config, err)
        assert not never.exists()
    (tmp_path / "bad.yml").write_text("models: [\n")
    _, err = merge(capsys, "--config", tmp_path / "bad.yml", "--out", never, rc=2)
    assert "is not valid YAML" in err

    # one slice over all layers, models as plain strings, slerp's base not among the models
    ok = tmp_path / "ok.yml"
    ok.write_text(yaml.safe_dump({"merge_method": "linear", "slices": [full], "out_dtype": "bfloat16"}))
    merge(capsys, "--config", ok, "--out", tmp_path / "sliced")
    merge(capsys, "--inputs", a, b, "--dtype", "bf16", "--out", tmp_path / "flags")
    for key in CheckpointReader(a).keys():
        assert torch.equal(CheckpointReader(str(tmp_path / "sliced")).read(key),
                           CheckpointReader(str(tmp_path / "flags")).read(key)), key
    ok.write_text(yaml.safe_dump({"merge_method": "slerp", "base_model": a, "models": [b],
                                  "parameters": {"t": 0}}))
    merge(capsys, "--config", ok, "--out", tmp_path / "slerp0")
    assert_units(tmp_path / "slerp0", [CheckpointReader(a)], lambda x: x)


@pytest.mark.dist
def test_layouts_merge_then_train_and_export(tmp_path):
    """Inputs saved at TP=2, PP=2 and EP=2 merge; the merge loads at TP=2 and EP=2, trains with
    --init-from, and exports to Hugging Face (Mixtral) with its experts and router."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from megatron_jai.hf.export import mcore_to_hf

    text = torchrun(2, os.path.join(REPO_ROOT, "tests", "dist", "merge_layouts.py"), tmp_path).stdout
    assert text.count("merged == mean of the inputs saved at TP=2, PP=2, EP=2") == 2, text
    assert f"initialised model weights from {tmp_path / 'merged'} (iteration 0)" in text, text
    assert "summary: 3 steps to iteration 3" in text, text

    merged = CheckpointReader(str(tmp_path / "merged"))
    from export_helpers import tiny_tokenizer

    mcore_to_hf(str(tmp_path / "merged"), str(tmp_path / "hf"), progress=False,
                tokenizer=tiny_tokenizer(str(tmp_path / "tok")))  # the inputs carry none
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), "pt") as f:
        names = list(f.keys())
        down = [n for n in names if "layers.1." in n and "experts" in n and ("w2" in n or "down" in n)]
        router = [n for n in names if "layers.1." in n and "gate.weight" in n]
        assert down and router, names
        assert torch.equal(f.get_tensor(router[0]), merged.read_layer("decoder.layers.mlp.router.weight", 1))
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"))
    with torch.no_grad():
        logits = model(torch.arange(8).unsqueeze(0)).logits
    assert logits.shape == (1, 8, CFG.vocab_size) and torch.isfinite(logits).all()
