"""Phases: the run config YAML, the built-in ``jai`` plan, and a phase switch 1 -> 2 -> 3 (longer
sequence, RoPE base and position interpolation in phase 3) end to end on a tiny model with real Thai
and English text, including an exact resume in the middle of phase 3."""
import json
import os

import pytest
import yaml

from conftest import REPO_ROOT, torchrun
from train_helpers import small_corpus

PRETRAIN = os.path.join(REPO_ROOT, "pretrain_jai.py")


# ---- config parsing (in-process, fast) -----------------------------------------------------------
def write_yaml(path, data):
    with open(path, "w") as f:
        yaml.safe_dump(data, f)
    return str(path)


def test_jai_plan_phases_and_flags_override_config(tmp_path):
    from megatron_jai.training.arguments import parse_args

    cfg = write_yaml(tmp_path / "run.yaml", {
        "model": "tiny", "lr": 1e-3, "global_batch_size": 32,
        "data": {"english": "en/text", "thai": "/abs/th"},
        "plan": {"name": "jai", "phase_tokens": [1e9, 2e9, 3e8], "seq_length": 4096,
                 "long_seq_length": 32768, "context_extension": "both"}})
    args = parse_args(["--config", cfg, "--lr", "2e-3"])
    assert args.lr == 2e-3 and args.global_batch_size == 32  # flag beats file, file beats default
    p1, p2, p3 = args.phases
    assert [p.name for p in args.phases] == ["english-recovery", "thai-injection",
                                             "context-extension"]
    assert p1.blend == ((1.0, str(tmp_path / "en" / "text")),)  # relative to the config file
    shares = dict((label, w) for label, (w, _) in zip(p2.dataset_names, p2.blend))
    assert shares == pytest.approx({"english": 0.73, "thai": 0.27})
    assert p3.seq_length == 32768 and p3.rotary_base == 500000.0
    assert p3.rotary_interpolation_factor == 8.0 and p3.lr_scale == 0.5
    assert p1.iterations(32) == -(-int(1e9) // (32 * 4096))  # token budget -> whole steps


def test_explicit_phases_and_config_errors(tmp_path):
    from megatron_jai.training.arguments import parse_args
    from megatron_jai.training.faults import TrainingError

    cfg = write_yaml(tmp_path / "ok.yaml", {
        "data": {"a": "/d/a", "b": "/d/b"},
        "phases": [{"name": "one", "blend": {"a": 3, "b": 1}, "seq_length": 64, "train_iters": 5},
                   {"blend": [[1, "/d/c"]], "seq_length": 128, "train_tokens": 10000,
                    "rotary_base": 1e6, "lr": 1e-4}]})
    one, two = parse_args(["--config", cfg]).phases
    assert one.blend == ((0.75, "/d/a"), (0.25, "/d/b")) and one.train_iters == 5
    assert two.name == "phase2" and two.rotary_base == 1e6 and two.lr == 1e-4

    bad = {
        "unknown setting 'lrr'": {"lrr": 1},
        "unknown keys \\['seq'\\]": {"phases": [{"blend": "/x", "seq": 3, "train_iters": 1}]},
        "exactly one of train_iters or train_tokens": {"phases": [{"blend": "/x",
                                                                   "seq_length": 8}]},
        "plan jai needs a dataset named 'thai'": {"data": {"english": "/e"},
                                                   "plan": {"name": "jai",
                                                            "phase_iters": [1, 1, 1]}},
        "unknown plan 'jia'": {"plan": "jia"},
    }
    for message, data in bad.items():
        with pytest.raises(TrainingError, match=message):
            parse_args(["--config", write_yaml(tmp_path / "bad.yaml", data)])


# ---- the phase switch, end to end ----------------------------------------------------------------
def read_metrics(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.mark.dist
def test_phase_switch_1_2_3_on_thai_and_english(shared_dir, tmp_path):
    corpus = small_corpus(shared_dir)
    config = write_yaml(tmp_path / "jai_tiny.yaml", {
        "model": "tiny", "tokenizer": corpus["tokenizer"],
        "micro_batch_size": 2, "global_batch_size": 8, "lr": 3e-3, "min_lr": 3e-4,
        "warmup_iters": 1, "log_interval": 1, "data_cache_dir": str(tmp_path / "cache"),
        "data": {"english": corpus["english"], "thai": corpus["thai"]},
        "plan": {"name": "jai", "phase_iters": [3, 3, 3], "seq_length": 32,
                 "long_seq_length": 64, "context_extension": "both", "long_rotary_base": 40000},
    })
    full = tmp_path / "full.jsonl"
    proc = torchrun(2, PRETRAIN, "--config", config, "--metrics-file", full,
                    "--save", tmp_path / "full_ckpt")
    records = read_metrics(full)
    assert [r["step"] for r in records] == list(range(1, 10))
    assert [r["phase"] for r in records] == ["english-recovery"] * 3 + ["thai-injection"] * 3 \
        + ["context-extension"] * 3
    assert [r["seq_length"] for r in records] == [32] * 6 + [64] * 3
    assert all(isinstance(r["loss"], float) for r in records)
    # Each phase restarts its schedule (a record's lr is the rate its update used; warm-up 1 step:
    # 0 at a phase's first step, its peak at the second); phase 3 peaks at phase3_lr_scale 0.5.
    assert [records[i]["lr"] for i in (0, 3, 6)] == [0.0, 0.0, 0.0]
    assert [records[i]["lr"] for i in (1, 4, 7)] == pytest.approx([3e-3, 3e-3, 1.5e-3])
    assert "loss/thai" not in records[0] and {"loss/english", "loss/thai"} <= set(records[4])
    assert "RoPE base 40000, position interpolation 2" in proc.stdout
    with open(tmp_path / "full_ckpt" / "model_config.json") as f:
        saved_cfg = json.load(f)
    assert saved_cfg["rotary_base"] == 40000 and saved_cfg["rotary_interpolation_factor"] == 2.0
    assert saved_cfg["max_position_embeddings"] >= 64
    # A checkpoint at every phase end (keep-last 3).
    assert sorted(os.listdir(tmp_path / "full_ckpt"))[:3] == [
        "iter_0000003", "iter_0000006", "iter_0000009"]

    # Stop inside phase 3 and resume: the phase, its step, RoPE and data position come back.
    part = tmp_path / "part.jsonl"
    torchrun(2, PRETRAIN, "--config", config, "--metrics-file", part, "--save",
             tmp_path / "part_ckpt", "--exit-after-step", 7)
    proc = torchrun(2, PRETRAIN, "--config", config, "--metrics-file", part, "--save",
                    tmp_path / "part_ckpt", "--load", tmp_path / "part_ckpt")
    assert "at iteration 7 (phase 3, step 1)" in proc.stdout
    resumed = read_metrics(part)
    assert [r["step"] for r in resumed] == list(range(1, 10))
    assert [r["loss"] for r in resumed] == [r["loss"] for r in records]  # bit-identical
