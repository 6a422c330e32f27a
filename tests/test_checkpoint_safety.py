"""Nothing is lost, and what a run asks for is what runs (issue 8, items 1-8 and 11):

* re-saving an iteration moves the old one aside first; a crash in between is repaired;
* an empty tracker is a one-line error naming the newest complete iteration;
* --overwrite-save deletes nothing before every check passed, never the checkpoint started from;
* a rollback moves the abandoned newer checkpoints aside, prunes within the new line of descent
  and never deletes its resume point;
* a full disk is one line, removes the partial checkpoint and keeps the previous one;
* SIGTERM during a periodic save stops the run without a second save;
* the first step of a phase runs at that phase's own LR; a finished run extends when asked to;
* validation has its own data: turning it on never changes what training sees.

Single-process runs of the tiny model (a few seconds each).
"""
import json
import os

import pytest
import yaml

from conftest import REPO_ROOT, last_error, run_python
from train_helpers import small_corpus

PRETRAIN = os.path.join(REPO_ROOT, "pretrain_jai.py")


def read_metrics(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def tracked(root):
    with open(os.path.join(root, "latest_checkpointed_iteration.txt")) as f:
        return int(f.read())


def iterations(root):
    return sorted(n for n in os.listdir(root) if n.startswith("iter_"))


@pytest.fixture(scope="module")
def corpus(shared_dir):
    return small_corpus(shared_dir)


@pytest.fixture(scope="module")
def common(corpus, tmp_path_factory):
    cache = tmp_path_factory.mktemp("safety_cache")
    return ["--data-path", corpus["english"], "--tokenizer", corpus["tokenizer"],
            "--global-batch-size", "4", "--micro-batch-size", "2", "--seq-length", "32",
            "--warmup-iters", "1", "--log-interval", "1", "--data-cache-dir", str(cache)]


def test_resaving_an_iteration_survives_a_crash_between_the_renames(tmp_path):
    from megatron_jai.checkpoint import dist as ckpt
    from megatron_jai.training.checkpointing import prune

    root = tmp_path / "root"
    old = root / "iter_0000005"
    old.mkdir(parents=True)
    (old / "data").write_text("old")
    ckpt.write_tracker(str(root), 5)

    def new_tmp():
        tmp = root / "iter_0000005.tmp"
        tmp.mkdir()
        (tmp / "data").write_text("new")
        return tmp

    class Crash(Exception):
        pass

    def crash(stage):
        if stage == "moved-aside":
            raise Crash

    with pytest.raises(Crash):
        ckpt.commit_iteration(str(root), 5, str(new_tmp()), between=crash)
    assert not old.exists() and tracked(root) == 5  # the moment of danger
    prune(str(root), keep_last=1)  # repairs first: the tracked iteration comes back
    assert (old / "data").read_text() == "old" and not (root / "iter_0000005.tmp").exists()
    ckpt.commit_iteration(str(root), 5, str(new_tmp()))
    assert (old / "data").read_text() == "new" and iterations(root) == ["iter_0000005"]
    assert tracked(root) == 5


def test_empty_tracker_names_the_newest_complete_iteration(tmp_path, common):
    root = tmp_path / "broken"
    for it in (4, 8):
        (root / f"iter_{it:07d}").mkdir(parents=True)
    (root / "latest_checkpointed_iteration.txt").write_text("")
    proc = run_python(PRETRAIN, *common, "--train-iters", 2, "--load", root, "--save", root,
                      check=False)
    assert proc.returncode == 2
    assert last_error(proc) == (
        f"pretrain_jai.py: error: {root}/latest_checkpointed_iteration.txt is empty or "
        f"unreadable; the newest complete iteration under {root} (saved without a manifest: "
        f"unverified) is 8 (resume it with --load-iteration 8, or write 8 into the tracker)")
    assert iterations(root) == ["iter_0000004", "iter_0000008"]


def test_overwrite_save_never_deletes_the_init_checkpoint(tmp_path):
    from megatron_jai.training.checkpointing import plan_save_dir
    from megatron_jai.training.faults import TrainingError

    root = tmp_path / "x"
    (root / "iter_0000003").mkdir(parents=True)
    with pytest.raises(TrainingError, match="would delete the --init-from checkpoint"):
        plan_save_dir(str(root), load=None, resume_iteration=None, init_from=str(root),
                      overwrite=True)
    with pytest.raises(TrainingError, match="already holds checkpoints of another run"):
        plan_save_dir(str(root), load=None, resume_iteration=None, init_from=None,
                      overwrite=False)
    plan = plan_save_dir(str(root), None, None, None, overwrite=True)
    assert plan.stale_iterations == [3] and iterations(root) == ["iter_0000003"]


def test_rollback_keep_last_extension_and_bad_inputs(tmp_path, common, corpus):
    root = tmp_path / "ckpt"
    first = tmp_path / "first.jsonl"
    # A: 6 steps, a checkpoint every 2, keep 2; validation every 2 steps on its own data.
    run_python(PRETRAIN, *common, "--train-iters", 6, "--save", root, "--save-interval", 2,
               "--keep-last", 2, "--eval-interval", 2, "--eval-iters", 1,
               "--valid-data-path", 0.5, corpus["thai"], 0.5, corpus["english"],
               "--metrics-file", first)
    a = {r["step"]: r for r in read_metrics(first)}
    assert iterations(root) == ["iter_0000004", "iter_0000006"]
    assert [s for s, r in a.items() if "valid_loss" in r] == [2, 4, 6]
    assert {"valid_loss/thai", "valid_loss/english"} <= set(a[2])  # the validation blend's own

    # A typo in --data-path with --overwrite-save: refused before anything is deleted.
    proc = run_python(PRETRAIN, *common[2:], "--data-path", tmp_path / "typo", "--train-iters", 2,
                      "--save", root, "--overwrite-save", check=False)
    assert proc.returncode == 2 and "typo" in last_error(proc)
    assert iterations(root) == ["iter_0000004", "iter_0000006"] and tracked(root) == 6
    # --eval-interval without validation data: one line (training data is never split off).
    proc = run_python(PRETRAIN, *common, "--train-iters", 2, "--eval-interval", 1, check=False)
    assert proc.returncode == 2 and "needs validation data" in last_error(proc)

    # B: roll back to 4 with keep-last 1: iteration 6 of the abandoned line is moved aside (not
    # deleted), the resume point stays, and the redone steps equal A's (no validation now; the
    # checkpoint's LR schedule, which decays over A's 6 steps, kept on request).
    second = tmp_path / "second.jsonl"
    proc = run_python(PRETRAIN, *common, "--train-iters", 8, "--load", root, "--save", root,
                      "--load-iteration", 4, "--save-interval", 2, "--keep-last", 1,
                      "--use-checkpoint-schedule", "--metrics-file", second)
    assert "decay steps 6 (checkpoint) vs 8 (this run); using the checkpoint's" in proc.stdout
    b = {r["step"]: r for r in read_metrics(second)}
    assert [b[s]["loss"] for s in (5, 6)] == [a[s]["loss"] for s in (5, 6)]
    abandoned = list((root / "abandoned").iterdir())
    assert len(abandoned) == 1 and abandoned[0].name.startswith("after_iter_0000004_")
    assert os.listdir(abandoned[0]) == ["iter_0000006"]
    assert iterations(root) == ["iter_0000004", "iter_0000008"] and tracked(root) == 8

    # C: the finished run, resumed with a larger --train-iters, extends (and says how).
    proc = run_python(PRETRAIN, *common, "--train-iters", 10, "--load", root, "--save", root,
                      "--keep-last", 1, "--metrics-file", second)
    assert "phase pretrain: extended from 8 to 10 steps" in proc.stdout
    assert "decay steps 6 (checkpoint) vs 10 (this run); using this run's" in proc.stdout
    assert [r["step"] for r in read_metrics(second)][-2:] == [9, 10] and tracked(root) == 10
    proc = run_python(PRETRAIN, *common, "--train-iters", 10, "--load", root, "--save", root)
    assert "training already complete at iteration 10" in proc.stdout

    # Validation on (A) or off (E) never changes training; E: SIGTERM while the periodic
    # checkpoint of step 1 is written stops the run after it, without a second save.
    e_root, e_metrics = tmp_path / "e", tmp_path / "e.jsonl"
    proc = run_python(PRETRAIN, *common, "--train-iters", 6, "--save", e_root, "--save-interval",
                      1, "--sigterm-during-save-at-step", 1, "--metrics-file", e_metrics)
    assert "SIGTERM received while saving step 1" in proc.stdout
    assert [r["step"] for r in read_metrics(e_metrics)] == [1]
    assert read_metrics(e_metrics)[0]["loss"] == a[1]["loss"]
    assert iterations(e_root) == ["iter_0000001"] and tracked(e_root) == 1


def test_phase_lr_and_full_disk(tmp_path, common, corpus):
    config = tmp_path / "two_phases.yaml"
    config.write_text(yaml.safe_dump({
        "data": {"english": corpus["english"]},
        "phases": [{"name": "a", "blend": {"english": 1}, "seq_length": 32, "train_iters": 2,
                    "lr": 1e-3, "warmup_iters": 0},
                   {"name": "b", "blend": {"english": 1}, "seq_length": 32, "train_iters": 2,
                    "lr": 2e-4, "min_lr": 1e-5, "warmup_iters": 0}]}))
    root, metrics = tmp_path / "full", tmp_path / "full.jsonl"
    flags = [a for a in common if a not in ("--data-path", corpus["english"], "--seq-length",
                                            "32")]
    proc = run_python(PRETRAIN, "--config", config, *flags, "--save", root, "--save-interval", 1,
                      "--full-disk-at-step", 3, "--metrics-file", metrics, check=False)
    records = read_metrics(metrics)
    # Each phase's first step runs at its own peak (no warm-up), not at the previous phase's.
    assert [r["phase"] for r in records] == ["a", "a", "b"]
    assert records[0]["lr"] == pytest.approx(1e-3) and records[2]["lr"] == pytest.approx(2e-4)
    # The disk fills up while step 3's checkpoint is written: one line, partial checkpoint
    # removed, the previous one intact.
    assert proc.returncode == 2
    assert last_error(proc) == (
        f"pretrain_jai.py: error: disk full while saving iteration 3 to {root} (partial "
        f"iter_0000003.tmp removed); the previous checkpoint {root}/iter_0000002 is intact; free "
        f"space and resume")
    assert iterations(root) == ["iter_0000001", "iter_0000002"] and tracked(root) == 2
    assert not (root / "jai_run.lock").exists()  # released on the error too
