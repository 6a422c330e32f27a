"""Expert and tensor parallelism of the MoE layer under torchrun (gloo)."""
import os

import pytest
from conftest import REPO_ROOT, torchrun

DIST = os.path.join(REPO_ROOT, "tests", "dist")
pytestmark = pytest.mark.dist


def test_ep2_equals_ep1_outputs_and_gradients():
    out = torchrun(2, os.path.join(DIST, "moe_ep_equivalence.py"), timeout=400)
    for case in ("dropless", "capacity", "skewed"):
        assert out.stdout.count(f"OK {case}") == 2, out.stdout


def test_tp2_with_and_without_sequence_parallelism_and_ep2_equal_tp1():
    """Experts split over TP along F, at TP=2, TP=2 with sequence parallelism (also with padding)
    and TP=2 + SP + EP=2 (4 ranks): the same outputs, input/router gradients and (sliced) expert
    gradients as TP=1; CPU initialisation gives each TP rank its slice of the TP=1 weights."""
    out = torchrun(4, os.path.join(DIST, "moe_tp_equivalence.py"), timeout=300)
    for case in ("tp2-dropless", "tp2-capacity", "tp2-sp-padding", "tp2-sp-capacity",
                 "tp2-sp-ep2-dropless", "tp2-sp-ep2-capacity"):
        assert out.stdout.count(f"OK {case} ") == 4, out.stdout


def test_tiny_moe_model_reshards_between_ep_and_trains_with_ep2(tmp_path):
    """Also: a DUS MoE model at TP=2 with sequence parallelism equals TP=1 (loss, gradients after
    finalize_model_grads, gradient norm) and its checkpoint loads without sequence parallelism."""
    out = torchrun(2, os.path.join(DIST, "moe_model_ep.py"), tmp_path, timeout=500)
    assert out.stdout.count("OK resharding") == 2, out.stdout
    assert out.stdout.count("OK tp resharding") == 2, out.stdout
    assert out.stdout.count("OK sequence parallel") == 2, out.stdout
    assert out.stdout.count("OK training") == 2, out.stdout


def test_pretrain_tiny_moe_with_ep2_then_resumes_at_pp2_and_tp2_sp(shared_dir, tmp_path):
    """pretrain_jai.py on the tiny MoE preset with EP=2 (DP=2): finite, falling loss, gradient
    clipping over the dense and expert optimizers, the validation loss, and router statistics
    summed over every data-parallel rank; its checkpoint (experts split over EP) resumes at PP=2,
    where the statistics come from both pipeline stages, and then at TP=2 with sequence
    parallelism (experts split over TP; the gathered tokens counted once)."""
    import json

    from train_helpers import small_corpus

    def metrics(path):
        with open(path) as f:
            return [json.loads(line) for line in f if line.strip()]

    corpus = small_corpus(shared_dir)
    script = os.path.join(REPO_ROOT, "pretrain_jai.py")
    common = ["--model", "tiny-moe", "--train-iters", "14", "--seq-length", "64",
              "--global-batch-size", "8", "--micro-batch-size", "2", "--lr", "1e-2",
              "--warmup-iters", "2", "--clip-grad", "0.5", "--save", tmp_path / "ckpt",
              "--log-interval", "1", "--data-cache-dir", tmp_path / "cache", "--seed", "3",
              "--data-path", corpus["english"], "--tokenizer", corpus["tokenizer"]]
    torchrun(2, script, *common, "--ep", "2", "--exit-after-step", "8", "--eval-interval", "4",
             "--eval-iters", "1", "--valid-data-path", corpus["thai"],
             "--metrics-file", tmp_path / "ep2.jsonl", timeout=500)
    first = metrics(tmp_path / "ep2.jsonl")
    assert [r["step"] for r in first] == list(range(1, 9))
    losses = [r["loss"] for r in first]
    assert all(l == l and abs(l) < 100 for l in losses), losses  # finite
    assert any(r["grad_norm"] > 0.5 for r in first)  # the clipping path ran
    assert all(r["moe/aux_loss"] > 0 and 0 < r["moe/entropy"] <= 1.3863 for r in first)
    # Every DP rank's tokens are counted (8 sequences x 64 tokens per layer and step).
    assert all(r["moe/tokens_per_layer"] == 8 * 64 for r in first), first[0]
    assert [r["step"] for r in first if "valid_loss" in r] == [4, 8]
    assert all(0 < r["valid_loss"] < 100 for r in first if "valid_loss" in r)
    torchrun(2, script, *common, "--pp", "2", "--load", tmp_path / "ckpt",
             "--metrics-file", tmp_path / "pp2.jsonl", timeout=500)
    resumed = metrics(tmp_path / "pp2.jsonl")
    assert [r["step"] for r in resumed] == list(range(9, 15))
    # Both stages' layers are counted, not only the first stage's.
    assert all(r["moe/tokens_per_layer"] == 8 * 64 for r in resumed), resumed[0]
    losses += [r["loss"] for r in resumed]
    torchrun(2, script, *common, "--train-iters", "16", "--tp", "2", "--sequence-parallel",
             "--load", tmp_path / "ckpt", "--metrics-file", tmp_path / "tp2_sp.jsonl", timeout=500)
    resumed = metrics(tmp_path / "tp2_sp.jsonl")
    assert [r["step"] for r in resumed] == [15, 16]
    assert all(r["moe/tokens_per_layer"] == 8 * 64 for r in resumed), resumed[0]
    losses += [r["loss"] for r in resumed]
    assert all(l == l for l in losses)
    assert losses[-1] < losses[0] - 0.5, losses
