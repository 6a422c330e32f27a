"""Issue 16, item 5: every numeric hyper-parameter is checked where the run config is parsed, so a
flag, the same value in a YAML config and a dry run all end in one line naming the setting and
the value, exit 2 (in-process: no training starts)."""
import importlib.util
import os

import pytest
import yaml

from conftest import REPO_ROOT

# (flags with one bad value, fragment of the one error line). Every flag here passed the dry run
# before issue 16 (or was clamped: --min-lr above --lr).
BAD_FLAGS = [
    (["--lr", "-1"], "--lr must be a finite number > 0, got -1.0"),
    (["--lr", "nan"], "--lr must be a finite number > 0, got nan"),
    (["--lr", "inf"], "--lr must be a finite number > 0, got inf"),
    (["--lr", "0"], "--lr must be a finite number > 0, got 0.0"),
    (["--min-lr", "-1"], "--min-lr must be a finite number >= 0, got -1.0"),
    (["--min-lr", "1e-2", "--lr", "1e-4"], "--min-lr 0.01 is above --lr 0.0001"),
    (["--warmup-iters", "-3"], "--warmup-iters must be an integer >= 0, got -3"),
    (["--lr-decay-iters", "-1"], "--lr-decay-iters must be an integer >= 0, got -1"),
    (["--adam-beta1", "1.5"], "--adam-beta1 must be in [0, 1), got 1.5"),
    (["--adam-beta1", "1"], "--adam-beta1 must be in [0, 1), got 1.0"),
    (["--adam-beta2", "-0.1"], "--adam-beta2 must be in [0, 1), got -0.1"),
    (["--adam-beta2", "nan"], "--adam-beta2 must be in [0, 1), got nan"),
    (["--adam-eps", "0"], "--adam-eps must be a finite number > 0, got 0.0"),
    (["--clip-grad", "-1"], "--clip-grad must be a finite number >= 0 (0 = no clipping), got -1.0"),
    (["--weight-decay", "-0.1"], "--weight-decay must be a finite number >= 0, got -0.1"),
    (["--weight-decay", "inf"], "--weight-decay must be a finite number >= 0, got inf"),
    (["--seed", "-1"], "--seed must be an integer in [0, 2**32), got -1"),
    (["--moe-aux-loss-coeff", "-0.01"], "--moe-aux-loss-coeff must be a finite number >= 0"),
    (["--eval-iters", "0"], "--eval-iters must be a positive integer, got 0"),
    (["--save-interval", "-5"], "--save-interval must be an integer >= 0 (0 = off), got -5"),
    (["--train-iters", "0"], "--train-iters must be a positive integer, got 0"),
]

# Config files only: a phase's (or the jai plan's) own schedule, and values of the wrong type.
BAD_CONFIGS = [
    ({"lr": "abc"}, "argument --lr: invalid float value: 'abc'"),
    ({"warmup_iters": 2.5}, "--warmup-iters must be an integer >= 0, got 2.5"),
    ({"clip_grad": [1]}, "--clip-grad must be a finite number >= 0"),
    ({"phases": [{"blend": "x", "seq_length": 32, "train_iters": 5, "lr": -1}]},
     "phase 1: lr must be a finite number > 0, got -1.0"),
    ({"phases": [{"blend": "x", "seq_length": 32, "train_iters": 5, "warmup_iters": -3}]},
     "phase 1: warmup_iters must be an integer >= 0, got -3"),
    ({"phases": [{"blend": "x", "seq_length": 32, "train_iters": 5, "lr": 1e-4,
                  "min_lr": 1e-3}]}, "phase 1: min_lr 0.001 is above lr 0.0001"),
    ({"phases": [{"blend": "x", "seq_length": 32, "train_iters": 5, "lr_scale": 0}]},
     "phase 1: lr_scale must be a finite number > 0, got 0.0"),
    # --min-lr of the run above one phase's own lr: an error, not the clamp of before.
    ({"min_lr": 1e-3, "phases": [{"blend": "x", "seq_length": 32, "train_iters": 5,
                                  "lr": 1e-4}]}, "phase phase1: min_lr 0.001 is above its lr"),
    ({"data": {"english": "e", "thai": "t"},
      "plan": {"name": "jai", "phase_iters": [1, 1, 1], "lr": "nan"}},
     "plan jai phase 1: lr must be a finite number > 0, got nan"),
    ({"data": {"english": "e", "thai": "t"},
      "plan": {"name": "jai", "phase_iters": [1, 1, 1], "phase3_lr_scale": -1}},
     "plan jai phase 3: lr_scale must be a finite number > 0, got -1.0"),
]

# The DPO objective's own values (posttrain_jai.py dpo): flags and config.
BAD_DPO = [
    (["--dpo-beta", "0"], "--dpo-beta"),
    (["--dpo-beta", "nan"], "--dpo-beta"),
    (["--dpo-label-smoothing", "0.5"], "--dpo-label-smoothing"),
    (["--dpo-nll-weight", "-1"], "--dpo-nll-weight"),
]


def _load(script):
    spec = importlib.util.spec_from_file_location(script, os.path.join(REPO_ROOT, f"{script}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _one_line(capsys, script, argv, prog, fragment):
    capsys.readouterr()
    try:
        rc = _load(script).main(argv)
    except SystemExit as exit_info:  # argparse's own usage errors
        rc = exit_info.code
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert rc == 2, (argv, out, err)
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), (argv, err)
    assert fragment in lines[0], (argv, lines[0])


DRY = ["--dry-run", "--world-size", "1", "--no-file-checks", "--model", "tiny"]


@pytest.mark.parametrize("flags,fragment", BAD_FLAGS, ids=[" ".join(f) for f, _ in BAD_FLAGS])
def test_bad_flag_is_one_line_in_the_dry_run_and_from_yaml(capsys, tmp_path, flags, fragment):
    _one_line(capsys, "pretrain_jai", [*DRY, *flags], "pretrain_jai.py", fragment)
    # The same values from a config file (numbers as YAML reads them).
    config = {flags[i][2:].replace("-", "_"): yaml.safe_load(flags[i + 1])
              for i in range(0, len(flags), 2)}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    _one_line(capsys, "pretrain_jai", [*DRY, "--config", str(path)], "pretrain_jai.py", fragment)


@pytest.mark.parametrize("config,fragment", BAD_CONFIGS, ids=[f for _, f in BAD_CONFIGS])
def test_bad_config_value_is_one_line(capsys, tmp_path, config, fragment):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    _one_line(capsys, "pretrain_jai", [*DRY, "--config", str(path)], "pretrain_jai.py", fragment)


@pytest.mark.parametrize("flags,fragment", BAD_DPO, ids=[" ".join(f) for f, _ in BAD_DPO])
def test_bad_dpo_value_is_one_line(capsys, tmp_path, flags, fragment):
    path = tmp_path / "dpo.yaml"
    path.write_text(yaml.safe_dump({flags[0][2:].replace("-", "_"): yaml.safe_load(flags[1])}))
    _one_line(capsys, "posttrain_jai", ["dpo", *DRY, "--config", str(path)],
              "posttrain_jai.py dpo", fragment)


def test_good_values_pass_and_min_lr_follows_the_peak(capsys):
    """Edge values that are valid, and no --min-lr: a tenth of each phase's peak (the schedule of
    the default run is what it was: 3e-3 -> 3e-4)."""
    from megatron_jai.training.arguments import parse_args
    from megatron_jai.training.arguments import flag_phase
    from megatron_jai.training.schedule import phase_schedule

    args = parse_args(["--lr", "1e-4", "--adam-beta1", "0", "--clip-grad", "0", "--min-lr", "0",
                       "--weight-decay", "0", "--warmup-iters", "0", "--train-iters", "5"])
    assert args.clip_grad == 0.0 and args.min_lr == 0.0
    args = parse_args(["--lr", "1e-4", "--train-iters", "5"])
    schedule = phase_schedule(args, flag_phase(args, "demo"), 5)
    assert schedule["max_lr"] == 1e-4 and schedule["min_lr"] == pytest.approx(1e-5)
    args = parse_args(["--train-iters", "5"])
    schedule = phase_schedule(args, flag_phase(args, "demo"), 5)
    assert schedule["max_lr"] == 3e-3 and schedule["min_lr"] == pytest.approx(3e-4)
