"""DUS.v2: layer plans, the skip-connection TransformerBlock, and ``tools/upscale.py dus``."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO_ROOT, run_cmd, torchrun
from upscale_cli import upscale

from megatron_jai.config import SkipConnection
from megatron_jai.parallel import crossing_skips, stage_boundaries, stage_local_layouts
from megatron_jai.presets import JAI_75B, TINY
from megatron_jai.upscale.plan import PlanError, get_plan, load_plan, make_plan

UPSCALE = os.path.join(REPO_ROOT, "tools", "upscale.py")
PP_SCRIPT = os.path.join(REPO_ROOT, "tests", "dist", "upscale_dus_pp.py")


# ---- plans -----------------------------------------------------------------------------------
def test_jai_plan_is_the_solar_layout_and_feeds_the_preset():
    plan = get_plan("phi3-medium-jai")
    assert plan.num_layers == 64 == JAI_75B.num_layers
    m = plan.layer_map()
    assert m[:12] == list(range(12))
    assert m[12:20] == [12, 13, 14, 15] * 2
    assert m[20:32] == [16, 17, 18, 19] * 3 and m[32:44] == [20, 21, 22, 23] * 3
    assert m[44:52] == [24, 25, 26, 27] * 2 and m[52:] == list(range(28, 40))
    pairs = {(s.source, s.target) for s in plan.skip_connections}
    assert pairs == {(12, 16), (20, 24), (32, 36), (44, 48), (20, 28), (32, 40)}
    assert all((s.alpha_train, s.alpha_infer) == (0.9, 0.8) for s in plan.skip_connections)
    assert JAI_75B.skip_connections == plan.skip_connections


def test_plan_files_and_bad_plans(tmp_path):
    y = tmp_path / "p.yaml"
    y.write_text("block_size: 2\nmultiplicities: [1, 3]\nalpha_infer: 0.5\n"
                 "skips: [{source: 2, target: 6, alpha_train: 0.3}, [0, 1]]\n")
    plan = load_plan(str(y))
    assert plan.name == "p" and plan.base_layers == 4 and plan.num_layers == 8
    assert plan.layer_map() == [0, 1, 2, 3, 2, 3, 2, 3]
    assert plan.skip_connections == (SkipConnection(0, 1, 0.9, 0.5), SkipConnection(2, 6, 0.3, 0.5))
    j = tmp_path / "q.json"
    j.write_text(json.dumps({"name": "q", "block_size": 1, "multiplicities": [1, 1], "skips": []}))
    assert load_plan(str(j)).skip_connections == ()
    assert make_plan("r", 4, 2, [2, 2]).skip_connections == (SkipConnection(0, 2), SkipConnection(4, 6))
    with pytest.raises(PlanError, match="cover 6 layers"):
        make_plan("bad", 8, 2, [1, 1, 1])
    with pytest.raises(PlanError, match="source < target"):
        make_plan("bad", 4, 2, [1, 1], skips=[[3, 2]])
    with pytest.raises(PlanError, match="alphas"):
        make_plan("bad", 4, 2, [1, 1], skips=[{"source": 0, "target": 2, "alpha_train": 1.5}])
    with pytest.raises(PlanError, match="unknown plan fields"):
        (tmp_path / "u.yaml").write_text("block_size: 1\nmultiplicities: [1]\nmultiplicity: 2\n")
        load_plan(str(tmp_path / "u.yaml"))
    with pytest.raises(PlanError, match="neither a built-in plan"):
        load_plan(str(tmp_path / "missing.yaml"))


def test_pipeline_layouts():
    skips = get_plan("phi3-medium-jai").skip_connections
    assert stage_boundaries(64, 4) == [16, 32, 48]
    assert stage_boundaries(64, 4, 20, 20) == [20, 32, 44]
    assert stage_boundaries(64, 4, 21, 20) is None  # 23 middle layers do not split over 2 stages
    assert {(s.source, s.target) for s in crossing_skips(skips, [16, 32, 48])} == {(12, 16), (44, 48)}
    assert stage_local_layouts(64, skips, 2)[0] == (None, None)  # even PP=2 boundary 32 is fine
    for first, last in stage_local_layouts(64, skips, 4)[:20]:
        assert first is not None and not crossing_skips(skips, stage_boundaries(64, 4, first, last))
    assert stage_local_layouts(64, skips, 4)[0] == (11, 15)  # slowest stage: 19 layers


# ---- the model: skip semantics in one process -------------------------------------------------
@pytest.fixture(scope="module")
def single_rank():
    from megatron_jai import parallel

    parallel.initialize(1, 1, seed=11)
    yield
    parallel.destroy()


def _layer_io(model, tokens):
    """Inputs and outputs of every decoder layer (inputs as the layer saw them, after the skips)."""
    ins, outs, handles = {}, {}, []
    for layer in model.decoder.layers:
        g = layer.layer_number - 1

        def hook(mod, args, kwargs, output, g=g):
            ins[g] = kwargs["hidden_states"].detach().clone()
            outs[g] = output[0].detach().clone()

        handles.append(layer.register_forward_hook(hook, with_kwargs=True))
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    logits = model(tokens, positions, None)
    for h in handles:
        h.remove()
    return ins, outs, logits


def test_skip_semantics_train_and_inference(single_rank):
    from megatron_jai.model import build_model
    from megatron_jai.model.dus_block import DusTransformerBlock

    skips = (SkipConnection(0, 2, 0.9, 0.8), SkipConnection(1, 3, 0.25, 0.5),
             SkipConnection(2, 3, 0.5, 0.0))  # layer 2 is a target and a source; 2->3 off at inference
    cfg = TINY.replace(skip_connections=skips)
    torch.manual_seed(0)
    model = build_model(cfg)
    assert isinstance(model.decoder, DusTransformerBlock)
    tokens = torch.randint(0, cfg.vocab_size, (2, 8), generator=torch.Generator().manual_seed(1))
    for training in (True, False):
        model.train(training)
        with torch.no_grad():
            ins, outs, _ = _layer_io(model, tokens)
        alpha = lambda s: s.alpha_train if training else s.alpha_infer  # noqa: E731
        torch.testing.assert_close(ins[1], outs[0])
        s02 = skips[0]
        expect2 = alpha(s02) * ins[0] + (1 - alpha(s02)) * outs[1]
        torch.testing.assert_close(ins[2], expect2)
        h3 = alpha(skips[1]) * ins[1] + (1 - alpha(skips[1])) * outs[2]
        h3 = alpha(skips[2]) * ins[2] + (1 - alpha(skips[2])) * h3
        torch.testing.assert_close(ins[3], h3)
        assert not torch.allclose(ins[3], outs[2])

    # alpha 0 everywhere = the same weights without skips
    off = cfg.replace(skip_connections=tuple(SkipConnection(s.source, s.target, 0.0, 0.0)
                                             for s in skips))
    plain = build_model(TINY)
    for m in (model, plain):
        m.eval()
    off_model = build_model(off)
    off_model.load_state_dict(model.state_dict())
    plain.load_state_dict(model.state_dict())
    with torch.no_grad():
        positions = torch.arange(8).expand_as(tokens)
        torch.testing.assert_close(off_model(tokens, positions, None), plain(tokens, positions, None))
        assert not torch.allclose(model(tokens, positions, None), plain(tokens, positions, None))


def _loss_and_grads(model, tokens):
    model.zero_grad(set_to_none=True)
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    loss = model(tokens, positions, None, labels=tokens).float().mean()
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("method,num_layers,chunks", [
    ("uniform", 1, 6), ("uniform", 3, 4), ("block", 2, 2), ("block", 6, 6)])
def test_full_recompute_keeps_skip_gradients(single_rank, monkeypatch, method, num_layers, chunks):
    """Full recompute (Megatron's per-phase switch on the shared config) gives the loss and every
    gradient of the run without it: skip states are saved and blended outside the checkpoints."""
    from megatron.core import tensor_parallel

    from megatron_jai.model import build_model

    # skip layers 1, 3 (target and source) and 5; layers 0, 2, 4 are not
    skips = (SkipConnection(1, 3, 0.9, 0.8), SkipConnection(3, 5, 0.5, 0.3))
    cfg = TINY.replace(num_layers=6, skip_connections=skips)
    torch.manual_seed(4)
    model = build_model(cfg)
    model.train()
    tokens = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(5))
    ref_loss, ref_grads = _loss_and_grads(model, tokens)

    calls = []
    checkpoint = tensor_parallel.checkpoint
    monkeypatch.setattr(tensor_parallel, "checkpoint",
                        lambda *a: calls.append(1) or checkpoint(*a))
    c = model.config
    c.recompute_granularity, c.recompute_method, c.recompute_num_layers = "full", method, num_layers
    try:
        loss, grads = _loss_and_grads(model, tokens)
        # uniform 3: chunks [0], [1, 2], [3, 4], [5] (cut at skip layers); block 2: layers 0, 1
        assert len(calls) == chunks, calls
        torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
        assert grads.keys() == ref_grads.keys() and len(grads) > 6
        for name, g in grads.items():
            assert g.abs().max() > 0, name
            torch.testing.assert_close(g, ref_grads[name], rtol=1e-5, atol=1e-7, msg=name)
        c.distribute_saved_activations = True
        with pytest.raises(ValueError, match="distribute_saved_activations"):
            _loss_and_grads(model, tokens)
    finally:
        c.recompute_granularity = c.recompute_method = c.recompute_num_layers = None
        c.distribute_saved_activations = False


# ---- tools/upscale.py dus ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def base_checkpoint(tmp_path_factory, single_rank):
    """A random 4-layer tiny model saved as our checkpoint."""
    from megatron_jai.checkpoint.dist import save_checkpoint
    from megatron_jai.model import build_model

    root = str(tmp_path_factory.mktemp("dus") / "base")
    torch.manual_seed(3)
    model = build_model(TINY)
    save_checkpoint(root, [model], TINY, iteration=5)
    return root


def _logits(ckpt, tokens, train=False):
    from megatron_jai.checkpoint.dist import load_checkpoint
    from megatron_jai.presets import load_model_config
    from megatron_jai.model import build_model

    model = build_model(load_model_config(ckpt))
    load_checkpoint(ckpt, [model])
    model.train(train)
    with torch.no_grad():
        return model(tokens, torch.arange(tokens.shape[1]).expand_as(tokens), None)


def test_dus_identity_plan_equals_base(base_checkpoint, tmp_path, capsys):
    plan = tmp_path / "identity.yaml"
    plan.write_text("block_size: 1\nmultiplicities: [1, 1, 1, 1]\nskips: []\n")
    out = str(tmp_path / "same")
    stdout, _ = upscale(capsys, "dus", "--in", base_checkpoint, "--plan", plan, "--out", out)
    assert "dus: 4 -> 4 layers, 0 skips" in stdout
    tokens = torch.randint(0, TINY.vocab_size, (2, 12), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(_logits(out, tokens), _logits(base_checkpoint, tokens), rtol=0, atol=0)


@pytest.mark.dist
def test_dus_duplication_layer_order_and_pp2(base_checkpoint, tmp_path, capsys):
    from megatron_jai.checkpoint.stream import CheckpointReader

    plan = tmp_path / "double.yaml"
    # 2x duplication; 1->5, 2->6 and 3->4 cross the PP=2 boundary at layer 4, layer 5 is both a
    # target and a source, and alphas differ between training and inference.
    plan.write_text("name: double\nblock_size: 2\nmultiplicities: [2, 2]\nskips: [[0, 2], [4, 6], "
                    "[1, 5], {source: 2, target: 6, alpha_train: 0.5, alpha_infer: 0.3}, [3, 4], "
                    "{source: 5, target: 7, alpha_train: 0.7, alpha_infer: 0.6}]\n")
    out = str(tmp_path / "deep")
    stdout, _ = upscale(capsys, "dus", "--in", base_checkpoint, "--plan", plan, "--out", out)
    assert "dus: 4 -> 8 layers, 6 skips" in stdout, stdout
    base, deep = CheckpointReader(base_checkpoint), CheckpointReader(out)
    assert deep.config.num_layers == 8 and deep.iteration == 0
    assert [(s.source, s.target) for s in deep.config.skip_connections] == \
        [(0, 2), (1, 5), (2, 6), (3, 4), (4, 6), (5, 7)]
    planned = [0, 1, 0, 1, 2, 3, 2, 3]
    layer_keys = [k for k in base.keys() if base.is_stacked(k)]
    assert len(layer_keys) >= 6
    for key in layer_keys:
        assert deep.shape(key)[0] == 8
        for new, old in enumerate(planned):
            assert torch.equal(deep.read_layer(key, new), base.read_layer(key, old)), (key, new)
        # the copies really differ between base layers (so the order check can fail)
        assert not torch.equal(base.read_layer(key, 0), base.read_layer(key, 1)) or "norm" in key
    for key in ("embedding.word_embeddings.weight", "output_layer.weight",
                "decoder.final_layernorm.weight"):
        assert torch.equal(deep.read(key), base.read(key))
    # the up-scaled checkpoint runs under PP=2 (saved states carried across the stage boundary)
    # with the loss, inference loss and gradients of PP=1, also with full activation recompute
    out2 = torchrun(2, PP_SCRIPT, out, tmp_path / "pp").stdout
    assert out2.count("OK rank=") == 2 and "crossing=3" in out2, out2
    assert out2.count("recompute=full") == 2, out2


def test_dus_cli_errors(base_checkpoint, tmp_path, capsys):
    err = upscale(capsys, "dus", "--in", base_checkpoint, "--plan", "phi3-medium-jai",
                  "--out", tmp_path / "x", expect_rc=2)[1]
    assert "40-layer base model" in err and not os.path.exists(tmp_path / "x")
    err = upscale(capsys, "dus", "--in", tmp_path / "nothing", "--out", tmp_path / "y",
                  expect_rc=2)[1]
    assert "does not exist" in err
    err = upscale(capsys, "dus", "--in", base_checkpoint, "--plan", "block_size: 2",
                  "--out", tmp_path / "z", expect_rc=2)[1]
    assert "neither a built-in plan" in err
    # the real command line: exit status 2, one line on stderr, no traceback
    p = subprocess.run([sys.executable, UPSCALE, "dus", "--in", base_checkpoint, "--plan", "phi3-medium-jai",
                        "--out", base_checkpoint], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": REPO_ROOT})
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert "dus --help" not in p.stderr and p.stderr.strip().splitlines()[-1].startswith(
        "upscale.py: error:")
    assert "--plan" in run_cmd([sys.executable, UPSCALE, "dus", "--help"]).stdout
