"""Fault handling of pretrain_jai.py: NaN steps skipped, counted and eventually fatal; SIGTERM saves
and exits 0; a process killed while saving leaves the previous checkpoint loadable; a vocabulary
that does not fit the model is refused with one clear line."""
import json
import os
import signal
import subprocess
import sys

import psutil
import pytest

from conftest import REPO_ROOT, free_port, run_python, torchrun
from train_helpers import small_corpus

PRETRAIN = os.path.join(REPO_ROOT, "pretrain_jai.py")


@pytest.fixture(scope="module")
def common(shared_dir, tmp_path_factory):
    corpus = small_corpus(shared_dir)
    tmp = tmp_path_factory.mktemp("faults")
    args = ["--data-path", corpus["english"], "--tokenizer", corpus["tokenizer"],
            "--global-batch-size", 4, "--micro-batch-size", 2, "--seq-length", 32,
            "--warmup-iters", 2, "--log-interval", 1, "--data-cache-dir", str(tmp / "cache")]
    return tmp, corpus, [str(a) for a in args]


def read_metrics(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_nan_steps_are_skipped_counted_and_abort_when_in_a_row(common):
    tmp, _, args = common
    metrics = tmp / "nan.jsonl"
    proc = run_python(PRETRAIN, *args, "--train-iters", 10, "--metrics-file", metrics,
                      "--inject-nan-at-step", 3, 5, 6, 7, "--max-skipped-steps", 2, check=False)
    records = {r["step"]: r for r in read_metrics(metrics)}
    # Step 3: skipped (no update: the LR schedule did not move, later losses stay finite).
    assert records[3]["skipped"] and records[3]["skipped_total"] == 1
    assert records[3]["loss"] == "nan"
    assert records[4]["lr"] == records[3]["lr"] != records[2]["lr"]
    assert not records[4]["skipped"] and isinstance(records[4]["loss"], float)
    assert records[5]["lr"] != records[4]["lr"]
    # Steps 5, 6, 7 in a row > --max-skipped-steps 2: a clear one-line abort, exit code 2.
    assert records[7]["skipped_total"] == 4 and 8 not in records
    assert proc.returncode == 2, proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and "3 steps in a row had a NaN/Inf loss" in errors[0]
    assert "Traceback" not in proc.stderr


@pytest.mark.dist
def test_sigterm_saves_and_exits_zero(common):
    """Slurm pre-emption signals every task: SIGTERM to both workers mid-run."""
    tmp, _, args = common
    root = tmp / "sigterm_ckpt"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO_ROOT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           f"--master_port={free_port()}", PRETRAIN, *args, "--train-iters", "1000",
           "--save", str(root)]
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        seen = []
        for line in proc.stdout:
            seen.append(line)
            if line.startswith("step      2 "):
                break
        else:
            pytest.fail("training never reached step 2:\n" + "".join(seen[-40:]))
        workers = [p for p in psutil.Process(proc.pid).children(recursive=True)
                   if "pretrain_jai.py" in " ".join(p.cmdline())]
        assert len(workers) == 2
        for w in workers:
            w.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    out = "".join(seen) + rest
    assert proc.returncode == 0, out[-4000:]
    assert "SIGTERM received: stopped after step" in out
    with open(root / "latest_checkpointed_iteration.txt") as f:
        iteration = int(f.read())
    assert 2 <= iteration < 1000
    assert (root / f"iter_{iteration:07d}").is_dir()
    assert f"checkpoint {root}/iter_{iteration:07d} (pre-empted)" in out


@pytest.mark.dist
def test_kill_during_save_leaves_previous_checkpoint(common):
    tmp, _, args = common
    root = tmp / "killed_ckpt"
    first = tmp / "killed.jsonl"
    proc = torchrun(2, PRETRAIN, *args, "--train-iters", 6, "--save", root, "--save-interval", 2,
                    "--kill-during-save-at-step", 4, "--metrics-file", first, check=False)
    assert proc.returncode != 0
    assert "TESTING: killed while saving" in proc.stdout
    # The interrupted save is a temporary directory; the tracker still names iteration 2.
    assert (root / "iter_0000004.tmp").is_dir() and not (root / "iter_0000004").exists()
    with open(root / "latest_checkpointed_iteration.txt") as f:
        assert int(f.read()) == 2
    killed = {r["step"]: r for r in read_metrics(first)}
    assert sorted(killed) == [1, 2, 3, 4]

    proc = torchrun(2, PRETRAIN, *args, "--train-iters", 6, "--save", root, "--load", root,
                    "--metrics-file", first)
    assert f"resumed from {root} at iteration 2" in proc.stdout
    records = read_metrics(first)
    # The metrics file drops what the killed run logged after its checkpoint, then continues.
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    resumed = {r["step"]: r for r in records}
    for step in (3, 4):  # redone after the resume: bit-identical to the killed run
        assert resumed[step]["loss"] == killed[step]["loss"]
    assert not (root / "iter_0000004.tmp").exists()  # cleaned up by the next save
    with open(root / "latest_checkpointed_iteration.txt") as f:
        assert int(f.read()) == 6


def test_load_without_a_checkpoint_is_refused(common, tmp_path):
    """--load naming an empty place (not the --save directory of a requeued job) is a mistake:
    one line, exit code 2, instead of silently training from scratch."""
    _, _, args = common
    proc = run_python(PRETRAIN, *args, "--train-iters", 1, "--load", tmp_path / "typo",
                      "--save", tmp_path / "ckpt", check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"pretrain_jai.py: error: --load {tmp_path / 'typo'}: no complete checkpoint there "
        f"(no latest_checkpointed_iteration.txt)")
    assert "Traceback" not in proc.stderr and not (tmp_path / "ckpt").exists()


def test_vocabulary_mismatch_is_refused(common, shared_dir, tmp_path):
    from megatron_jai.presets import TINY
    from megatron_jai.training.faults import TrainingError
    from megatron_jai.training.data_loading import check_vocabulary
    from megatron_jai.training.phases import Phase

    _, corpus, args = common
    phase = Phase(name="p", blend=((1.0, corpus["english"]),), seq_length=32, train_iters=1)
    check_vocabulary(TINY, [phase], corpus["tokenizer"])  # 1,000 ids fit 1,024 rows
    with pytest.raises(TrainingError, match=r"was tokenized with a 1000-id vocabulary.*only 512"):
        check_vocabulary(TINY.replace(vocab_size=512), [phase], None)

    # The CLI: Phi-3's tokenizer (32,011 ids) with the tiny model: one line, exit code 2.
    phi3 = os.path.join(shared_dir, "tokenizers", "phi3")
    cli_args = [a if a != corpus["tokenizer"] else phi3 for a in args]
    proc = run_python(PRETRAIN, *cli_args, "--train-iters", 2, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("pretrain_jai.py: error: tokenizer ")
    assert "32011 ids but model 'tiny' only 1024" in proc.stderr
    assert "Traceback" not in proc.stderr
