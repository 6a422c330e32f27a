"""pretrain_jai.py under torchrun (2 CPU processes, gloo) on real Thai + English text:

* TP=2 and PP=2 tiny runs: finite, falling loss; checkpoints that load again (issue 2);
* exact resume: 8 steps == 4 steps + resume + 4 steps, bit-identical losses and grad norms (TP=2);
  a run killed while saving step 8 and resumed ends in the uninterrupted run's checkpoint: every
  tensor and every rank's RNG states (python, numpy, torch) bit for bit, only the command line
  differs;
* resume into another layout (TP=2 checkpoint -> PP=2, and -> DP=2): first-step loss within 1e-5.
"""
import json
import math
import os

import pytest

from conftest import REPO_ROOT, torchrun
from train_helpers import small_corpus

pytestmark = pytest.mark.dist

PRETRAIN = os.path.join(REPO_ROOT, "pretrain_jai.py")
STEPS = 8


def read_metrics(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def run(shared_dir, tmp_path_factory):
    corpus = small_corpus(shared_dir)
    tmp = tmp_path_factory.mktemp("resume")
    common = ["--data-path", "0.5", corpus["english"], "0.5", corpus["thai"],
              "--tokenizer", corpus["tokenizer"], "--train-iters", STEPS, "--warmup-iters", 2,
              "--global-batch-size", 8, "--micro-batch-size", 2, "--seq-length", 64,
              "--log-interval", 1, "--data-cache-dir", str(tmp / "cache")]

    def _run(name, *args, check=True):
        metrics = tmp / f"{name}.jsonl"
        proc = torchrun(2, PRETRAIN, *common, "--metrics-file", metrics, *args, check=check)
        return proc, (read_metrics(metrics) if metrics.exists() else [])

    _run.tmp = tmp
    return _run


@pytest.fixture(scope="module")
def reference(run):
    """An uninterrupted TP=2 run of all steps, saving at the half-way step and at the end."""
    root = run.tmp / "reference_ckpt"
    _, records = run("reference", "--tp", 2, "--save", root, "--save-interval", STEPS // 2)
    return root, records


def test_tp2_loss_finite_and_falling(reference):
    root, records = reference
    losses = [r["loss"] for r in records]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0] - 0.2, losses
    assert all(r["tokens_per_s"] > 0 and r["tflops_per_gpu"] > 0 for r in records)
    assert {"loss/english", "loss/thai"} <= set(records[-1])
    assert sorted(os.listdir(root)) == ["iter_0000004", "iter_0000008",
                                        "latest_checkpointed_iteration.txt", "model_config.json",
                                        "tokenizer"]
    assert os.listdir(root / "tokenizer") == ["tokenizer.model"]  # the run's, for exports


def test_exact_resume_tp2(run, reference):
    """4 steps + resume + 4 steps == 8 steps: bit-identical losses, grad norms and LRs."""
    root, ref = reference
    proc, records = run("resumed", "--tp", 2, "--load", root, "--load-iteration", STEPS // 2)
    assert f"resumed from {root} at iteration 4" in proc.stdout
    assert [r["step"] for r in records] == list(range(STEPS // 2 + 1, STEPS + 1))
    for want, got in zip(ref[STEPS // 2:], records):
        assert got["loss"] == want["loss"], (got["step"], got["loss"], want["loss"])
        assert got["grad_norm"] == want["grad_norm"]
        assert got["lr"] == want["lr"]


# What may differ between the two final checkpoints: the runs' own command lines.
RUN_FLAGS = ("load", "save", "metrics_file", "kill_during_save_at_step")


def test_killed_and_resumed_checkpoint_equals_uninterrupted(run, reference):
    from megatron_jai.checkpoint.diff import diff_iterations

    root, _ = reference
    killed = run.tmp / "killed_ckpt"
    proc, _ = run("killed", "--tp", 2, "--save", killed, "--save-interval", STEPS // 2,
                  "--kill-during-save-at-step", STEPS, check=False)
    assert proc.returncode != 0 and (killed / f"iter_{STEPS:07d}.tmp").is_dir(), proc.stdout
    proc, _ = run("killed_resumed", "--tp", 2, "--load", killed, "--save", killed,
                  "--save-interval", STEPS // 2)
    assert f"resumed from {killed} at iteration {STEPS // 2}" in proc.stdout
    final = f"iter_{STEPS:07d}"
    differences = diff_iterations(root / final, killed / final,
                                  ignore=[f"common/args/{k}" for k in RUN_FLAGS])
    assert differences == [], "\n".join(differences)


def test_resume_into_pp2_then_dp2(run, reference):
    """Another layout (TP=2 checkpoint -> PP=2): same loss within 1e-5 at the first step; PP=2
    keeps training (finite, falling loss) and writes a checkpoint that loads again into DP=2."""
    root, ref = reference
    saved = run.tmp / "pp2_ckpt"
    proc, records = run("pp2", "--pp", 2, "--load", root, "--load-iteration", STEPS // 2,
                        "--save", saved)
    assert "layout changed" in proc.stdout
    assert records[0]["step"] == STEPS // 2 + 1
    assert abs(records[0]["loss"] - ref[STEPS // 2]["loss"]) < 1e-5
    losses = [r["loss"] for r in records]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < ref[0]["loss"] - 0.2
    with open(saved / "latest_checkpointed_iteration.txt") as f:
        assert int(f.read()) == STEPS

    proc, _ = run("dp2_load", "--load", saved)  # DP=2 loads it; training is already complete
    assert f"resumed from {saved} at iteration {STEPS}" in proc.stdout
    assert "training already complete" in proc.stdout
