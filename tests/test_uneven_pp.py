"""Uneven pipeline splits (``--first-stage-layers`` / ``--last-stage-layers``): validation, training
a DUS model under an uneven PP=2 with ``pretrain_jai.py``, and reloading its checkpoint at PP=1."""
import json
import math
import os

import pytest

from conftest import REPO_ROOT, torchrun

from megatron_jai.config import SkipConnection
from megatron_jai.parallel import pipeline_stage_layers
from megatron_jai.presets import JAI_75B, TINY
from megatron_jai.training.faults import TrainingError

TRAIN_AND_RELOAD = os.path.join(REPO_ROOT, "tests", "dist", "train_uneven_pp_reload.py")


def test_uneven_split_reaches_megatron_and_bad_splits_are_refused():
    tc = JAI_75B.transformer_config(pp=4, first_stage_layers=11, last_stage_layers=15)
    assert (tc.num_layers_in_first_pipeline_stage, tc.num_layers_in_last_pipeline_stage) == (11, 15)
    assert pipeline_stage_layers(64, 4, 11, 15) == [11, 19, 19, 15]
    assert pipeline_stage_layers(6, 2, None, 4) == [2, 4] and pipeline_stage_layers(8, 4) == [2] * 4
    with pytest.raises(ValueError, match="39 remaining layers must divide evenly over the 2 other"):
        JAI_75B.transformer_config(pp=4, first_stage_layers=10, last_stage_layers=15)
    with pytest.raises(ValueError, match="first \\+ last must equal 6 when PP=2"):
        TINY.replace(num_layers=6).transformer_config(pp=2, first_stage_layers=2,
                                                      last_stage_layers=2)
    with pytest.raises(ValueError, match="first pipeline stage must be between 1 and 3"):
        TINY.transformer_config(pp=2, first_stage_layers=4)
    with pytest.raises(ValueError, match="need pipeline parallel size >= 2"):
        TINY.transformer_config(pp=1, last_stage_layers=2)
    with pytest.raises(ValueError, match="must divide num_layers 6 \\(or give the first/last"):
        TINY.replace(num_layers=6).transformer_config(pp=4)


def test_dus_hint_prints_the_pretrain_flags():
    from upscale_cli import upscale_tool

    hint = upscale_tool._pp_hint(JAI_75B)
    assert "PP=2 stage-local" in hint
    assert "PP=4 2 carried (stage-local with first/last stage 11/15 layers: --pp 4 " \
           "--first-stage-layers 11 --last-stage-layers 15)" in hint, hint
    # the printed split is one Megatron accepts
    JAI_75B.transformer_config(pp=4, first_stage_layers=11, last_stage_layers=15)


def test_stage_layer_flags_are_checked_early():
    from megatron_jai.training.arguments import parse_args

    args = parse_args(["--pp", "2", "--first-stage-layers", "1", "--train-iters", "1"])
    assert (args.first_stage_layers, args.last_stage_layers) == (1, None)
    with pytest.raises(TrainingError, match="--first-stage-layers needs --pp 2 or more"):
        parse_args(["--first-stage-layers", "2", "--train-iters", "1"])
    with pytest.raises(TrainingError, match="--last-stage-layers must be a positive integer"):
        parse_args(["--pp", "2", "--last-stage-layers", "0", "--train-iters", "1"])


@pytest.mark.dist
def test_dus_model_trains_under_uneven_pp2_and_reloads_at_pp1(shared_dir, tmp_path):
    """6 layers split 2+4: skip 0->1 stays on stage 0, 2->5 on stage 1 (an even 3+3 split would
    carry it), 1->3 is carried across the uneven boundary."""
    from train_helpers import small_corpus

    corpus = small_corpus(shared_dir)
    cfg = TINY.replace(name="tiny-dus6", num_layers=6, skip_connections=(
        SkipConnection(0, 1), SkipConnection(1, 3, 0.5, 0.4), SkipConnection(2, 5, 0.7, 0.6)))
    cfg.save(str(tmp_path / "model_config.json"))
    metrics, ckpt = tmp_path / "m.jsonl", tmp_path / "ckpt"
    out = torchrun(2, TRAIN_AND_RELOAD, ckpt, 2, "--model", tmp_path / "model_config.json",
                   "--pp", 2, "--first-stage-layers", 2, "--data-path", corpus["english"],
                   "--tokenizer", corpus["tokenizer"], "--train-iters", 3,
                   "--global-batch-size", 4, "--micro-batch-size", 2, "--seq-length", 32,
                   "--warmup-iters", 1, "--log-interval", 1,
                   "--data-cache-dir", tmp_path / "cache", "--metrics-file", metrics,
                   "--save", ckpt).stdout
    assert "layout TP=1 PP=2 (stage layers 2+4) EP=1 DP=1" in out, out
    assert "summary: 3 steps to iteration 3" in out and f"{ckpt}/iter_0000003" in out, out
    losses = [json.loads(line)["loss"] for line in open(metrics)]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses), losses
    assert out.count("OK rank=") == 2, out
    assert "stage_layers=[0, 1] carried=1" in out and "stage_layers=[2, 3, 4, 5] carried=1" in out
    assert "max_logit_diff=" in out, out
