"""The embedded tiny default of pretrain_jai.py: no arguments -> tiny model, demo corpus, DP=2;
here shortened to 40 steps (the full default is 200): the loss must fall from ~ln(1024) to < 5."""
import json
import math
import os

import pytest

from conftest import REPO_ROOT, torchrun

PRETRAIN = os.path.join(REPO_ROOT, "pretrain_jai.py")


def test_no_arguments_means_the_tiny_demo():
    from megatron_jai.training.arguments import parse_args

    args = parse_args([])
    assert args.no_arguments and args.phases is None and args.data_path is None
    assert args.model is None and args.train_iters == 200 and (args.tp, args.pp) == (1, 1)


@pytest.mark.dist
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
