"""Checkpoint merging (``tools/merge_checkpoints.py``): the four methods against plain-torch
references, streaming memory, refusals, and (under torchrun) inputs saved at TP=2 / PP=2 / EP=2,
training from the merge and exporting it."""
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


def units(reader, key):
    """What slerp and ties merge as one tensor: a layer, an expert of a layer, a whole tensor."""
    if not reader.is_stacked(key):
        return [reader.read(key)]
    layers = [reader.read_layer(key, i) for i in range(reader.shape(key)[0])]
    return [e for layer in layers for e in layer] if ".mlp.experts." in key else layers


def assert_units(out, readers, reference, **tol):
    out = CheckpointReader(str(out))
    assert sorted(out.keys()) == sorted(readers[0].keys())
    for key in readers[0].keys():
        for got, *xs in zip(units(out, key), *(units(r, key) for r in readers)):
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
    assert line.startswith("merge linear: 2 inputs, ") and "held at most" in line and "peak RSS" in line
    m = CheckpointReader(str(out))
    assert {"decoder.layers.mlp.experts.weight_gate_up", "decoder.layers.mlp.experts.weight_down",
            "decoder.layers.mlp.router.weight"} <= set(m.keys())
    for key in a.keys():
        mean = torch.stack([a.read(key), b.read(key)]).mean(0)
        assert torch.equal(m.read(key).view(torch.int32), mean.view(torch.int32)), key
    # an ordinary model-only checkpoint root: tracker, iteration 0, config, the tokenizer
    assert sorted(os.listdir(out)) == ["iter_0000000", "latest_checkpointed_iteration.txt",
                                       "merge.json", "model_config.json", "tokenizer"]
    assert m.iteration == 0 and m.config == CFG and m.common == {}
    assert sorted(m.object_keys()) == sorted(a.object_keys())
    assert (out / "tokenizer" / "tokenizer.model").read_bytes() == b"the same tokenizer"
    record = json.loads((out / "merge.json").read_text())
    assert record["method"] == "linear" and record["weights"] == [1.0, 1.0]
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


def test_ties_sign_election_and_trim_by_hand():
    from megatron_jai.checkpoint.merge import ties, trim

    base = torch.zeros(4)
    x1, x2 = torch.tensor([1.0, -2.0, 3.0, 0.0]), torch.tensor([-3.0, 1.0, 1.0, 0.0])
    # sums -2, -1, 4, 0 elect -, -, +, +: entry 0 keeps only x2, entry 1 only x1, entry 2 both
    assert torch.equal(ties(base, [x1, x2], [1.0, 1.0]), torch.tensor([-3.0, -2.0, 2.0, 0.0]))
    assert torch.equal(trim(torch.tensor([0.1, -0.5, 0.3, -0.05]), 0.5),
                       torch.tensor([0.0, -0.5, 0.3, 0.0]))


def test_streaming_holds_a_few_tensors(tmp_path):
    """A 24-layer model of 97 equal-sized tensors: the merge holds a handful of them at once."""
    from megatron_jai.checkpoint.merge import merge_checkpoints

    gen = torch.Generator().manual_seed(0)
    roots = [str(tmp_path / f"in{n}") for n in range(3)]
    for root in roots:
        with CheckpointWriter(root, CFG.replace(num_layers=24)) as w:
            w.write("embedding.word_embeddings.weight", torch.randn(128, 64, generator=gen))
            for key in [f"decoder.layers.t{i}.weight" for i in range(4)]:
                for i in range(24):
                    w.write_layer(key, i, 24, torch.randn(128, 64, generator=gen))
    largest = 128 * 64 * 4
    for method, kw in (("linear", {}), ("ties", dict(base=roots[2], density=0.5))):
        s = merge_checkpoints(method, roots[:2], str(tmp_path / method), progress=False, **kw)
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
        (["--method", "slerp", "--inputs", a, b, base], "exactly two inputs, got 3"),
        (["--method", "slerp", "--inputs", a, b, "--t", 1.5], "--t must be in [0, 1]"),
        (["--method", "ties", "--inputs", a, b], "ties needs --base"),
        (["--method", "task_arithmetic", "--inputs", a], "needs --base"),
        (["--method", "ties", "--base", base, "--inputs", a, "--density", 0], "--density must be"),
        (["--inputs", a, b, "--weights", 1, 2, 3], "3 weights for 2 inputs"),
        (["--inputs", a, b, "--t", 0.5], "--t is for slerp"),
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
