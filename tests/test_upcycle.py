"""MoE upcycling (``tools/upscale.py moe``): expert seeding, router init, function preservation."""
import os
import sys

import pytest
import torch

from conftest import REPO_ROOT, run_cmd, torchrun
from upscale_cli import upscale

from megatron_jai.presets import TINY

UPSCALE = os.path.join(REPO_ROOT, "tools", "upscale.py")
EP_SCRIPT = os.path.join(REPO_ROOT, "tests", "dist", "upscale_moe_ep.py")
DENSE = TINY.replace(name="tiny-dense", num_layers=2)


@pytest.fixture(scope="module")
def dense_checkpoints(tmp_path_factory):
    """Two random dense tiny checkpoints (stand-ins for two training snapshots)."""
    from megatron_jai import parallel
    from megatron_jai.checkpoint.dist import save_checkpoint
    from megatron_jai.model import build_model

    parallel.initialize(1, 1, seed=21)
    d = tmp_path_factory.mktemp("upcycle")
    roots = []
    for i in range(2):
        torch.manual_seed(40 + i)
        model = build_model(DENSE)
        root = str(d / f"dense{i}")
        save_checkpoint(root, [model], DENSE, iteration=100 * i)
        roots.append(root)
    yield roots
    parallel.destroy()


def _upcycle(capsys, *args):
    return upscale(capsys, "moe", *args)[0]


def _logits(ckpt, tokens):
    from megatron_jai.checkpoint.dist import load_checkpoint
    from megatron_jai.presets import load_model_config
    from megatron_jai.model import build_model

    model = build_model(load_model_config(ckpt))
    load_checkpoint(ckpt, [model])  # strict: every key of the MoE model must be in the checkpoint
    model.eval()
    with torch.no_grad():
        return model(tokens, torch.arange(tokens.shape[1]).expand_as(tokens), None)


def test_single_checkpoint_upcycle_preserves_logits(dense_checkpoints, tmp_path, capsys):
    from megatron_jai.checkpoint.stream import CheckpointReader

    dense = dense_checkpoints[0]
    out = tmp_path / "moe"
    summary = _upcycle(capsys, "--in", dense, "--experts", 4, "--top-k", 2, "--router-std", 0.02,
                       "--out", out)
    assert "moe: 2 layers x 4 experts (top-2) from 1 checkpoint(s)" in summary, summary
    r, d = CheckpointReader(str(out)), CheckpointReader(dense)
    cfg = r.config
    assert (cfg.num_experts, cfg.moe_top_k, cfg.moe_normalize_topk) == (4, 2, True)
    assert r.shape("decoder.layers.mlp.experts.weight_gate_up") == (2, 4, 2 * 160, 64)
    for layer in range(2):
        fc1 = d.read_layer("decoder.layers.mlp.linear_fc1.weight", layer)
        experts = r.read_layer("decoder.layers.mlp.experts.weight_gate_up", layer)
        assert all(torch.equal(experts[e], fc1) for e in range(4))
        router = r.read_layer("decoder.layers.mlp.router.weight", layer)
        assert router.shape == (4, 64) and 0.01 < router.std().item() < 0.03
        assert torch.equal(r.read_layer("decoder.layers.pre_mlp_layernorm.weight", layer),
                           d.read_layer("decoder.layers.mlp.linear_fc1.layer_norm_weight", layer))
    tokens = torch.randint(0, DENSE.vocab_size, (2, 16), generator=torch.Generator().manual_seed(3))
    dense_logits, moe_logits = _logits(dense, tokens), _logits(str(out), tokens)
    torch.testing.assert_close(moe_logits, dense_logits, rtol=1e-5, atol=1e-5)

    # noise makes the experts (and so the function) differ: the comparison above can fail
    noisy = tmp_path / "noisy"
    _upcycle(capsys, "--in", dense, "--experts", 4, "--noise-std", 0.05, "--router-std", 0.02, "--out", noisy)
    assert not torch.allclose(_logits(str(noisy), tokens), dense_logits, atol=1e-3)


def test_experts_from_snapshots_and_shared_weights(dense_checkpoints, tmp_path, capsys):
    from megatron_jai.checkpoint.stream import CheckpointReader

    out = tmp_path / "moe2"
    # snapshots of a training run are iteration directories of one root: accepted as inputs too
    snapshot = os.path.join(dense_checkpoints[1], "iter_0000100")
    _upcycle(capsys, "--in", dense_checkpoints[0], snapshot, "--experts", 4, "--top-k", 2,
             "--router-std", 0, "--out", out)
    r = CheckpointReader(str(out))
    srcs = [CheckpointReader(c) for c in dense_checkpoints]
    for layer in range(2):
        down = r.read_layer("decoder.layers.mlp.experts.weight_down", layer)
        for e in range(4):
            assert torch.equal(down[e], srcs[e % 2].read_layer("decoder.layers.mlp.linear_fc2.weight",
                                                               layer))
        assert torch.count_nonzero(r.read_layer("decoder.layers.mlp.router.weight", layer)) == 0
    qkv = "decoder.layers.self_attention.linear_qkv.weight"
    assert torch.equal(r.read_layer(qkv, 1), srcs[0].read_layer(qkv, 1))  # shared from input 1
    last = tmp_path / "last"  # chronological snapshots: the shared weights of the newest
    _upcycle(capsys, "--in", dense_checkpoints[0], snapshot, "--shared-from", "last", "--out", last)
    snap = CheckpointReader(snapshot)
    for key in (qkv, "embedding.word_embeddings.weight"):
        read = (lambda c: c.read_layer(key, 1)) if key == qkv else (lambda c: c.read(key))
        assert torch.equal(read(CheckpointReader(str(last))), read(snap)), key
        assert not torch.equal(read(snap), read(srcs[0])), key  # the test can tell them apart
    avg = tmp_path / "avg"
    _upcycle(capsys, "--in", *dense_checkpoints, "--experts", 2, "--average-shared", "--out", avg)
    mean = (srcs[0].read_layer(qkv, 1) + srcs[1].read_layer(qkv, 1)) / 2
    torch.testing.assert_close(CheckpointReader(str(avg)).read_layer(qkv, 1), mean)



def test_default_router_is_near_uniform_and_spreads_tokens(dense_checkpoints, tmp_path, capsys):
    """The default router init: probabilities near uniform, yet the tokens' top-2 spread over all
    experts (a zero router would send every token to experts 0 and 1)."""
    from megatron_jai.checkpoint.stream import CheckpointReader
    from megatron_jai.upscale.upcycle import ROUTER_LOGIT_STD

    out = tmp_path / "moe_default"
    _upcycle(capsys, "--in", dense_checkpoints[0], "--experts", 4, "--top-k", 2, "--out", out)
    r = CheckpointReader(str(out))
    gen = torch.Generator().manual_seed(0)
    for layer in range(2):
        router = r.read_layer("decoder.layers.mlp.router.weight", layer).float()
        norm = r.read_layer("decoder.layers.pre_mlp_layernorm.weight", layer).float()
        # router inputs as the layer sees them: RMS-normalised states times the norm weight
        x = torch.randn(4096, norm.numel(), generator=gen)
        x = x / x.pow(2).mean(-1, keepdim=True).sqrt() * norm
        logits = x @ router.t()
        assert 0.5 * ROUTER_LOGIT_STD < logits.std().item() < 2 * ROUTER_LOGIT_STD
        probs = logits.softmax(-1)
        assert (probs - 0.25).abs().max().item() < 0.02, "probabilities must start near uniform"
        load = torch.bincount(logits.topk(2, dim=-1).indices.flatten(), minlength=4) / (2 * 4096)
        assert load.min().item() > 0.1, f"layer {layer}: tokens not spread over the experts: {load}"


@pytest.mark.dist
def test_upcycle_under_expert_parallelism(dense_checkpoints, tmp_path, capsys):
    out = tmp_path / "moe_ep"
    _upcycle(capsys, "--in", dense_checkpoints[1], "--experts", 4, "--top-k", 2, "--router-std", 0.5,
             "--out", out)
    text = torchrun(2, EP_SCRIPT, dense_checkpoints[1], out).stdout
    assert text.count("OK rank=") == 2, text


def test_upcycle_errors(dense_checkpoints, tmp_path, capsys):
    def fails(*args):
        return upscale(capsys, "moe", *args, expect_rc=2)[1]

    moe = tmp_path / "m"
    _upcycle(capsys, "--in", dense_checkpoints[0], "--experts", 2, "--out", moe)
    assert "already has 2 experts" in fails("--in", moe, "--out", tmp_path / "x")
    assert "at most one per expert" in fails("--in", *dense_checkpoints, "--experts", 1,
                                             "--out", tmp_path / "y")
    assert "--top-k" in fails("--in", dense_checkpoints[0], "--top-k", 5, "--out", tmp_path / "z")
    assert "already exists" in fails("--in", dense_checkpoints[0], "--out", moe)
    assert not any(os.path.exists(tmp_path / n) for n in "xyz")
    # the real command line: one clear line on stderr, no traceback, exit status 2
    import subprocess

    p = subprocess.run([sys.executable, UPSCALE, "moe", "--in", str(moe), "--out", str(tmp_path / "w")],
                       capture_output=True, text=True, env={**os.environ, "PYTHONPATH": REPO_ROOT})
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines()[-1].startswith("upscale.py: error: model"), p.stderr
    assert "--noise-std" in run_cmd([sys.executable, UPSCALE, "moe", "--help"]).stdout
