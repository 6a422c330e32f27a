"""The embedded tiny default of pretrain_jai.py: no arguments -> tiny model, demo corpus, DP=2;
here shortened to 40 steps (the full default is 200): the loss must fall from ~ln(1024) to < 5."""
import json
import math
import os

from conftest import REPO_ROOT, torchrun

PRETRAIN = os.path.join(REPO_ROOT, "pretrain_jai.py")


def test_no_arguments_means_the_tiny_demo():
    from megatron_jai.training.arguments import parse_args

    args = parse_args([])
    assert args.no_arguments and args.phases is None and args.data_path is None
    assert args.model is None and args.train_iters == 200 and (args.tp, args.pp) == (1, 1)


def test_demo_corpus_loss_falls(tmp_path):
    metrics = tmp_path / "demo.jsonl"
    proc = torchrun(2, PRETRAIN, "--train-iters", 40, "--log-interval", 10,
                    "--metrics-file", metrics, "--save", tmp_path / "ckpt",
                    env={"PYTHONWARNINGS": ""})  # the run itself must keep library warnings out
    assert not [line for line in proc.stderr.splitlines() if "Warning" in line], proc.stderr
    assert proc.stderr.count("no TE/apex") == 1, proc.stderr  # one short line, rank 0 only
    records = [json.loads(line) for line in open(metrics)]
    losses = [r["loss"] for r in records]
    assert len(losses) == 40 and all(math.isfinite(x) for x in losses)
    assert abs(losses[0] - math.log(1024)) < 0.5, losses[0]
    assert losses[-1] < 5.0, losses[-1]
    summary = proc.stdout.strip().splitlines()[-1]
    assert summary.startswith("summary: 40 steps to iteration 40, loss ")
    assert f"checkpoint {tmp_path / 'ckpt'}/iter_0000040" in summary


def test_moe_model_with_expert_parallel_logs_router_stats(shared_dir, tmp_path):
    """tiny-moe with EP=2: MoE dense+expert optimizers (gradient clipping over both), router
    statistics and the validation loss in the metrics."""
    from train_helpers import small_corpus

    corpus = small_corpus(shared_dir)
    metrics = tmp_path / "moe.jsonl"
    torchrun(2, PRETRAIN, "--model", "tiny-moe", "--ep", 2, "--data-path", corpus["english"],
             "--tokenizer", corpus["tokenizer"], "--train-iters", 6, "--global-batch-size", 8,
             "--micro-batch-size", 2, "--seq-length", 32, "--warmup-iters", 2,
             "--eval-interval", 3, "--eval-iters", 1, "--clip-grad", 0.5,
             "--data-cache-dir", tmp_path / "cache", "--metrics-file", metrics)
    records = [json.loads(line) for line in open(metrics)]
    assert records[-1]["loss"] < records[0]["loss"]
    assert any(r["grad_norm"] > 0.5 for r in records)  # the clipping path ran
    for key in ("moe/aux_loss", "moe/z_loss", "moe/entropy", "moe/dropped_fraction",
                "moe/max_load"):
        assert all(math.isfinite(r[key]) for r in records), key
    assert 0 < records[-1]["moe/entropy"] <= math.log(4) + 1e-6
    assert [r["step"] for r in records if "valid_loss" in r] == [3, 6]
    assert all(math.isfinite(r["valid_loss"]) for r in records if "valid_loss" in r)
