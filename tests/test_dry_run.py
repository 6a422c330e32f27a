"""pretrain_jai.py --dry-run --world-size N: one CPU process, no process group; every example
config passes at its documented world size, and launch failures are exit-2 problems."""
import glob
import os
import re

import pytest

from conftest import REPO_ROOT

EXAMPLES = sorted(glob.glob(os.path.join(REPO_ROOT, "examples", "*.yaml")))


def dry_run(capsys, *argv):
    import importlib.util

    spec = importlib.util.spec_from_file_location("pretrain_jai",
                                                  os.path.join(REPO_ROOT, "pretrain_jai.py"))
    pretrain_jai = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pretrain_jai)
    rc = pretrain_jai.main(["--dry-run", *map(str, argv)])
    out = capsys.readouterr()
    return rc, out.out + out.err


def documented_world_size(path):
    with open(path) as f:
        found = re.findall(r"--dry-run --world-size (\d+)", f.read())
    assert found, f"{path} documents no dry-run world size"
    return int(found[0])


@pytest.mark.parametrize("config", EXAMPLES, ids=os.path.basename)
def test_every_example_passes_at_its_documented_world_size(capsys, config):
    rc, out = dry_run(capsys, "--config", config, "--world-size", documented_world_size(config),
                      "--no-file-checks")
    assert rc == 0, out
    assert "dry run: OK" in out and "phase plan:" in out and "total/GPU" in out


def test_stage_layout_crossing_skips_and_problems(capsys, tmp_path):
    from megatron_jai.config import SkipConnection
    from megatron_jai.presets import TINY_MOE

    cfg = TINY_MOE.replace(name="tiny-dus", num_layers=6,
                           skip_connections=(SkipConnection(1, 4), SkipConnection(3, 5)))
    path = tmp_path / "tiny_dus.json"
    cfg.save(str(path))
    rc, out = dry_run(capsys, "--model", path, "--world-size", 4, "--pp", 2, "--ep", 2,
                      "--train-iters", 10, "--first-stage-layers", 4, "--no-file-checks")
    assert rc == 0, out
    rows = [line.split() for line in out.splitlines() if re.match(r"\s+[01]\s+\d+-\d+", line)]
    assert [r[:3] for r in rows] == [["0", "0-3", "(4)"], ["1", "4-5", "(2)"]]
    assert rows[1][3] == "1->4,"  # carried into stage 1; 3->5 too
    assert "2 cross a stage boundary" in out

    # What a launch would fail on: each is one problem line, exit 2.
    rc, out = dry_run(capsys, "--model", path, "--world-size", 6, "--tp", 4, "--ep", 3,
                      "--train-iters", 10, "--global-batch-size", 6, "--eval-interval", 5,
                      "--no-file-checks")
    assert rc == 2
    problems = [line for line in out.splitlines() if line.startswith("pretrain_jai.py: error:")]
    assert any("world size 6 is not a multiple of TP*PP = 4*1" in p for p in problems), out
    assert any("needs validation data" in p for p in problems), out
    assert "problem(s) that would fail the launch" in out

    # Files are checked unless --no-file-checks: a data typo fails here, not on the cluster.
    rc, out = dry_run(capsys, "--model", "tiny", "--world-size", 2, "--train-iters", 5,
                      "--data-path", tmp_path / "typo")
    assert rc == 2 and "typo" in out


def test_help_names_only_real_defaults(capsys):
    """--help shows a default where it says something (never "(default: None)"), for both entry
    scripts and each post-training mode."""
    import importlib.util

    for script, argv in (("pretrain_jai", ["--help"]), ("posttrain_jai", ["sft", "--help"]),
                         ("posttrain_jai", ["dpo", "--help"])):
        spec = importlib.util.spec_from_file_location(script,
                                                      os.path.join(REPO_ROOT, f"{script}.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        with pytest.raises(SystemExit) as exit_info:
            module.main(argv)
        text = capsys.readouterr().out
        assert exit_info.value.code == 0 and "--train-iters" in text
        assert "(default: None)" not in text and "(default: False)" not in text
        assert "(default: 3)" in text  # --keep-last
