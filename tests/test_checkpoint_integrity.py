"""Checkpoint integrity, a real full disk, one run per save directory (issue 16, items 1-3):

* every iteration has a manifest (size + CRC32 of each file), written last; each kind of damage
  (random bytes in a shard, truncated / deleted shard, deleted metadata, common.pt cut short, a
  deleted manifest, an added file) is one line naming the file and the newest iteration that
  verifies, from training, the tools and tools/verify_checkpoint.py alike; older checkpoints
  without a manifest still load, with a note;
* a deleted tracker names the newest verifying iteration (not "another run");
* ENOSPC is recognised in the forms a real full disk takes (recorded chains below; a real tmpfs
  where this machine lets us mount one);
* --save is locked by the run using it: a second run is refused, a SIGKILLed holder's lock is
  taken over, another host's needs --force-unlock, SIGTERM releases it.

Single-process runs of the tiny model (a few seconds each).
"""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import REPO_ROOT, last_error, run_python, run_tool

from megatron_jai.checkpoint.manifest import iteration_dir
from train_helpers import small_corpus

PRETRAIN = os.path.join(REPO_ROOT, "pretrain_jai.py")
TRACKER = "latest_checkpointed_iteration.txt"


@pytest.fixture(scope="module")
def common(shared_dir, tmp_path_factory):
    corpus = small_corpus(shared_dir)
    cache = tmp_path_factory.mktemp("integrity_cache")
    return ["--data-path", corpus["english"], "--tokenizer", corpus["tokenizer"],
            "--global-batch-size", "4", "--micro-batch-size", "2", "--seq-length", "32",
            "--warmup-iters", "1", "--log-interval", "1", "--data-cache-dir", str(cache)]


@pytest.fixture(scope="module")
def trained(common, tmp_path_factory):
    """A training root with iterations 2, 4 and 6, each with its manifest."""
    root = tmp_path_factory.mktemp("integrity") / "ckpt"
    run_python(PRETRAIN, *common, "--train-iters", 6, "--save", root, "--save-interval", 2)
    return str(root)


def copy_of(trained, tmp_path, name="c"):
    dest = tmp_path / name
    shutil.copytree(trained, dest)
    return str(dest)


def biggest_shard(directory):
    shards = [n for n in os.listdir(directory) if n.endswith(".distcp")]
    return os.path.join(directory, max(shards, key=lambda n: os.path.getsize(
        os.path.join(directory, n))))


def scribble(path, nbytes=64, seed=0):
    """``nbytes`` random bytes over the middle of the file (its size unchanged)."""
    import random

    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.seek(size // 2)
        old = f.read(nbytes)
        data = random.Random(seed).randbytes(nbytes)
        assert data != old
        f.seek(size // 2)
        f.write(data)


def cut(path, size):
    with open(path, "r+b") as f:
        f.truncate(size)


# ---- the manifest ------------------------------------------------------------------------------
def test_every_iteration_has_a_manifest_written_last(trained, capsys):
    from megatron_jai.checkpoint import manifest

    assert sorted(n for n in os.listdir(trained) if n.startswith("iter_")) == [
        "iter_0000002", "iter_0000004", "iter_0000006"]
    for it in (2, 4, 6):
        directory = iteration_dir(trained, it)
        with open(os.path.join(directory, manifest.MANIFEST_FILE)) as f:
            files = json.load(f)["files"]
        assert sorted(files) == manifest.list_files(directory)
        assert {".metadata", "common.pt", "metadata.json"} <= set(files)
        assert any(n.endswith(".distcp") for n in files)
        newest = max(os.stat(os.path.join(directory, n)).st_mtime_ns for n in files)
        assert os.stat(os.path.join(directory, manifest.MANIFEST_FILE)).st_mtime_ns >= newest
    out, _ = run_tool(capsys, "verify_checkpoint", trained, "--all")
    assert out.splitlines()[-1].startswith(f"summary: 3 iteration(s) of {trained}: 3 verified")
    assert not os.path.exists(os.path.join(trained, "jai_run.lock"))  # released at the end


CORRUPTIONS = {
    # name: (damage to iteration 6, what the one line says about the file)
    "64 random bytes in a shard": (lambda d: scribble(biggest_shard(d)), "contents changed"),
    "a truncated shard": (lambda d: cut(biggest_shard(d), os.path.getsize(biggest_shard(d)) // 2),
                          "truncated"),
    "a deleted shard": (lambda d: os.remove(biggest_shard(d)), "missing"),
    "a deleted metadata.json": (lambda d: os.remove(os.path.join(d, "metadata.json")), "missing"),
    "a deleted .metadata": (lambda d: os.remove(os.path.join(d, ".metadata")), "missing"),
    "common.pt cut to 100 bytes": (lambda d: cut(os.path.join(d, "common.pt"), 100),
                                   "truncated"),
    "a deleted manifest": (lambda d: os.remove(os.path.join(d, "jai_manifest.json")),
                           "missing (the checkpoint was saved with one; it was deleted)"),
    "an added file": (lambda d: open(os.path.join(d, "__9_0.distcp"), "wb").close(),
                      "not in the manifest"),
}


def test_each_corruption_is_one_line_naming_the_file_and_the_way_out(trained, tmp_path, capsys):
    caught = []
    for i, (case, (damage, what)) in enumerate(CORRUPTIONS.items()):
        root = copy_of(trained, tmp_path, f"case{i}")
        damage(iteration_dir(root, 6))
        _, err = run_tool(capsys, "verify_checkpoint", root, expect_rc=2)
        line = err.strip().splitlines()[-1]
        assert line.startswith(f"verify_checkpoint.py: error: {iteration_dir(root, 6)}/"), (case, line)
        assert what in line, (case, line)
        assert line.endswith(f"; the newest iteration under {root} that verifies is 4 (resume it "
                             f"with --load-iteration 4)"), (case, line)
        caught.append(case)
    assert caught == list(CORRUPTIONS)


def test_training_refuses_a_damaged_checkpoint_and_resumes_from_the_good_one(trained, tmp_path,
                                                                             common):
    """Before the manifest, 64 random bytes in a shard resumed with exit 0 on damaged weights."""
    root = copy_of(trained, tmp_path)
    shard = biggest_shard(iteration_dir(root, 6))
    scribble(shard)
    proc = run_python(PRETRAIN, *common, "--train-iters", 8, "--load", root, "--save", root,
                      check=False)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    from megatron_jai.checkpoint import manifest

    with open(os.path.join(iteration_dir(root, 6), manifest.MANIFEST_FILE)) as f:
        recorded = json.load(f)["files"][os.path.basename(shard)]["crc32"]
    assert last_error(proc) == (
        f"pretrain_jai.py: error: {shard}: contents changed (CRC32 "
        f"{manifest.file_entry(shard)['crc32']}, the manifest says {recorded}); the newest "
        f"iteration under {root} that verifies is 4 (resume it with --load-iteration 4)")
    assert not os.path.exists(iteration_dir(root, 8)) and not os.path.exists(
        os.path.join(root, "jai_run.lock"))
    proc = run_python(PRETRAIN, *common, "--train-iters", 6, "--load", root, "--save", root,
                      "--load-iteration", 4)
    assert f"resumed from {root} at iteration 4" in proc.stdout


def test_a_deleted_tracker_names_the_newest_verifying_iteration(trained, tmp_path, common):
    """Before: '--save X already holds checkpoints of another run; resume with --load X'."""
    root = copy_of(trained, tmp_path)
    os.remove(os.path.join(root, TRACKER))
    scribble(biggest_shard(iteration_dir(root, 6)))  # the newest does not verify: 4 is the way out
    proc = run_python(PRETRAIN, *common, "--train-iters", 8, "--load", root, "--save", root,
                      check=False)
    assert proc.returncode == 2
    assert last_error(proc) == (
        f"pretrain_jai.py: error: {root}/{TRACKER} is missing but {root} holds iterations "
        f"[2, 4, 6]; the newest complete iteration under {root} that verifies is 4 (resume it "
        f"with --load-iteration 4, or write 4 into the tracker)")


def test_tools_verify_their_inputs_and_older_checkpoints_load_with_a_note(trained, tmp_path,
                                                                          capsys):
    import torch

    from megatron_jai.checkpoint import manifest
    from megatron_jai.checkpoint.stream import CheckpointReader

    root = copy_of(trained, tmp_path)
    cut(os.path.join(iteration_dir(root, 6), "common.pt"), 100)
    # The export (mcore-to-hf) reads through CheckpointReader, as merge, upscale, generate and
    # evaluate do: one line, naming the iteration to read instead.
    _, err = run_tool(capsys, "convert_checkpoint", "mcore-to-hf", "--mcore-dir", root, "--out",
                      tmp_path / "hf", expect_rc=2)
    assert err.strip().splitlines()[-1] == (
        f"convert_checkpoint.py: error: {iteration_dir(root, 6)}/common.pt: truncated (100 bytes, "
        f"the manifest says {os.path.getsize(os.path.join(trained, 'iter_0000006', 'common.pt'))}"
        f"); the newest iteration under {root} that verifies is 4 (read it as "
        f"{iteration_dir(root, 4)})")
    assert not (tmp_path / "hf").exists()

    # A checkpoint from before manifests: no manifest, no mark in common.pt. Read, with a note.
    old = iteration_dir(root, 4)
    os.remove(os.path.join(old, manifest.MANIFEST_FILE))
    common_pt = os.path.join(old, "common.pt")
    state = torch.load(common_pt, weights_only=False)
    del state[manifest.COMMON_KEY]
    torch.save(state, common_pt)
    capsys.readouterr()
    reader = CheckpointReader(old)
    assert reader.iteration == 4 and reader.config.name == "tiny"
    assert capsys.readouterr().err.strip() == (
        f"note: {old} has no jai_manifest.json (saved before checkpoints had manifests); read "
        f"without verification")
    out, _ = run_tool(capsys, "verify_checkpoint", root, "--iteration", 4)
    assert "iter_0000004: note: no jai_manifest.json" in out


# ---- a full disk -------------------------------------------------------------------------------
def _recorded_chains():
    """The exceptions real full disks raised in this project's saves (tmpfs of 4 and 15 MB, one
    and two processes; types and messages as recorded), rebuilt."""
    from torch.distributed.checkpoint.api import CheckpointException

    def with_context(err, context):
        err.__context__ = context
        return err

    return {
        # rank 0, torch.save of common.pt (Megatron-Core's save_common) with 4 KB left
        "common.pt zip writer": with_context(
            RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0"),
            RuntimeError("basic_ios::clear: iostream error")),
        # one process, DCP's writer process out of space while writing a .distcp file
        "writer process": CheckpointException("write", {0: (RuntimeError(
            "Worker failure: [Errno 28] No space left on device"), None)}),
        # two processes, 15 MB: the zip writer's enforce failure inside the writer process
        "writer process, zip writer": CheckpointException("write", {0: (RuntimeError(
            "Worker failure: [enforce fail at inline_container.cc:672] . unexpected pos 704 vs "
            "598"), None)}),
        # rank 0 copying the tokenizer into the save root
        "tokenizer copy": OSError(28, "No space left on device"),
        # not recorded here (EDQUOT, an OSError below a wrapper): the chain is followed
        "chained": with_context(RuntimeError("write failed"), OSError(122, "Disk quota exceeded")),
    }


# What the other rank saw in the same runs: no disk-full in its own exception.
PEER_FAILURES = {
    "DCP, non-coordinator": lambda: __import__(
        "torch.distributed.checkpoint.api", fromlist=["CheckpointException"]
    ).CheckpointException("write", {}),
    "gloo, peer gone": lambda: RuntimeError(
        "[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed "
        "by peer [127.0.0.1]:20892. This is typically caused by a remote worker crashing."),
}


def test_full_disk_is_recognised_in_every_recorded_form(tmp_path, monkeypatch):
    import torch.distributed as tdist

    from megatron_jai.checkpoint import dist as ckpt

    for name, err in _recorded_chains().items():
        assert ckpt.is_disk_full(err), name
    for other in (RuntimeError("[enforce fail at inline_container.cc:319] . file not found: "
                               "archive/data.pkl"), OSError(13, "Permission denied"),
                  ValueError("unexpected pos in a config"), *(f() for f in PEER_FAILURES.values())):
        assert not ckpt.is_disk_full(other), other
    # The other ranks: their own failure is not a full disk, but the job's store says a rank
    # found one; then they give the same line (rank 0 prints it) and remove their .tmp.
    store = tdist.HashStore()
    monkeypatch.setattr(ckpt, "_job_store", lambda: store)
    monkeypatch.setattr(ckpt, "PEER_WAIT_S", 0.2)
    root = tmp_path / "r"
    (root / "iter_0000005.tmp").mkdir(parents=True)
    for name, make in PEER_FAILURES.items():
        ckpt.raise_if_disk_full(make(), str(root), 5)  # nobody found a full disk: returns
    ckpt.raise_if_disk_full(ValueError("unrelated"), str(root), 5)
    with pytest.raises(ckpt.CheckpointError, match=r"^disk full while saving iteration 5 to "):
        ckpt.raise_if_disk_full(_recorded_chains()["writer process"], str(root), 5)
    assert not (root / "iter_0000005.tmp").exists()
    for name, make in PEER_FAILURES.items():
        (root / "iter_0000005.tmp").mkdir()
        with pytest.raises(ckpt.CheckpointError, match=r"there is no earlier checkpoint"):
            ckpt.raise_if_disk_full(make(), str(root), 5)
        assert not (root / "iter_0000005.tmp").exists(), name


@pytest.fixture
def tmpfs(tmp_path):
    """A 15 MB tmpfs, or a skip where this machine does not let us mount one."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=15m", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip() or proc.returncode}); the "
                    f"recorded exception chains cover the recognition")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_a_real_full_disk_is_one_line_and_keeps_the_previous_checkpoint(tmpfs, common):
    """Before: 'RuntimeError: [enforce fail at inline_container.cc:672] unexpected pos', exit 1,
    with the .tmp left behind."""
    root = tmpfs / "ckpt"
    proc = run_python(PRETRAIN, *common, "--train-iters", 8, "--save", root, "--save-interval", 1,
                      "--keep-last", 8, check=False)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    line = last_error(proc)
    tracked = int(open(root / TRACKER).read())
    assert line == (f"pretrain_jai.py: error: disk full while saving iteration {tracked + 1} to "
                    f"{root} (partial iter_{tracked + 1:07d}.tmp removed); the previous "
                    f"checkpoint {iteration_dir(root, tracked)} is intact; free space and resume")
    assert sorted(os.listdir(root)) == sorted([TRACKER, "model_config.json", "tokenizer",
                                               *[f"iter_{i:07d}" for i in range(1, tracked + 1)]])
    from megatron_jai.checkpoint import manifest

    assert manifest.check(iteration_dir(root, tracked)).ok


@pytest.mark.dist
def test_a_real_full_disk_on_two_ranks_ends_both_with_one_line(tmpfs, common):
    from conftest import torchrun

    root = tmpfs / "ckpt"
    proc = torchrun(2, PRETRAIN, *common, "--train-iters", 8, "--save", root, "--save-interval",
                    1, "--keep-last", 8, check=False)
    assert proc.returncode != 0
    errors = [line for line in (proc.stdout + proc.stderr).splitlines()
              if line.startswith("pretrain_jai.py: error:")]
    tracked = int(open(root / TRACKER).read())
    assert errors == [f"pretrain_jai.py: error: disk full while saving iteration {tracked + 1} "
                      f"to {root} (partial iter_{tracked + 1:07d}.tmp removed); the previous "
                      f"checkpoint {iteration_dir(root, tracked)} is intact; free space and resume"]
    assert "[rank0]: Traceback" not in proc.stderr and "[rank1]: Traceback" not in proc.stderr
    assert "exitcode  : 2" in proc.stderr  # the workers' own exit code (torchrun then says 1)
    assert not [n for n in os.listdir(root) if n.endswith(".tmp")]


# ---- one run per save directory ----------------------------------------------------------------
def test_lock_holder_takeover_and_force(tmp_path):
    from megatron_jai.checkpoint import lock

    root = str(tmp_path / "save")
    held, notes = lock.acquire(root)
    assert notes == [] and lock.read_holder(root)["pid"] == os.getpid()
    with pytest.raises(lock.SaveDirLockError, match=rf"--save {root} is in use by another run "
                                                    rf"\(pid {os.getpid()} on host "):
        lock.acquire(root)
    held.release()
    assert not os.path.exists(lock.lock_path(root)) and not os.path.exists(root)  # made by it

    # A holder killed with SIGKILL (same host, gone): taken over with a note.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    os.makedirs(root)
    record = {"host": socket.gethostname(), "pid": dead.pid, "started_utc": "then"}
    with open(lock.lock_path(root), "w") as f:
        json.dump(record, f)
    held, notes = lock.acquire(root)
    assert notes == [f"note: --save {root}: took over the lock of pid {dead.pid} on host "
                     f"{socket.gethostname()}, started then, which is no longer running"]
    held.release()
    assert os.path.isdir(root)  # not made by this lock

    # Another host: cannot be checked from here, needs --force-unlock.
    with open(lock.lock_path(root), "w") as f:
        json.dump({"host": "elsewhere", "pid": 1, "started_utc": "then"}, f)
    with pytest.raises(lock.SaveDirLockError, match="cannot be checked from .*; if that run has "
                                                    "ended, pass --force-unlock"):
        lock.acquire(root)
    held, notes = lock.acquire(root, force=True)
    assert notes[0].endswith("(forced)")
    held.release()

    # --load of a directory a live run holds: read (complete, verified iterations only), with a
    # note, and left untouched; --save is this run's own.
    from megatron_jai.training.checkpointing import lock_run_dirs

    other, _ = lock.acquire(root)
    mine, notes, read_only = lock_run_dirs(str(tmp_path / "mine"), root, None, False)
    assert read_only == {root} and notes == [
        f"note: --load {root} belongs to a run in progress (pid {os.getpid()} on host "
        f"{socket.gethostname()}, started {lock.read_holder(root)['started_utc']}); reading its "
        f"newest complete iteration, which is verified first"]
    assert lock.read_holder(str(tmp_path / "mine"))["token"] == mine.token
    mine.release()
    other.release()


def test_sigterm_releases_the_lock(tmp_path):
    root = tmp_path / "save"
    code = ("import sys, time; from megatron_jai.checkpoint import lock; "
            f"lock.acquire({str(root)!r}); print('held', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                            text=True, env=dict(os.environ, PYTHONPATH=REPO_ROOT))
    assert proc.stdout.readline().strip() == "held"
    assert (root / "jai_run.lock").exists()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    assert not root.exists()  # the lock, and the directory it made, are gone


@pytest.mark.dist  # two runs at once: slow on 2 shared cores
def test_two_runs_cannot_share_a_save_directory(tmp_path, common):
    """Before: run B resumed from run A's checkpoint while A trained, then died on A's .tmp."""
    root = tmp_path / "shared"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO_ROOT)
    a = subprocess.Popen([sys.executable, PRETRAIN, *common, "--train-iters", "100000",
                          "--save", str(root), "--save-interval", "100000"], cwd=REPO_ROOT,
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in a.stdout:
            if line.startswith("step "):
                break
        else:
            pytest.fail("run A never trained")
        b = run_python(PRETRAIN, *common, "--train-iters", 2, "--load", root, "--save", root,
                       check=False)
        assert b.returncode == 2
        assert last_error(b).startswith(f"pretrain_jai.py: error: --save {root} is in use by "
                                       f"another run (pid {a.pid} on host {socket.gethostname()}")
        a.kill()  # SIGKILL: the lock stays behind ...
        a.wait()
        assert (root / "jai_run.lock").exists()
    finally:
        if a.poll() is None:
            a.kill()
    # ... and the next run takes it over (same host, holder gone).
    c = run_python(PRETRAIN, *common, "--train-iters", 1, "--load", root, "--save", root)
    assert (f"note: --save {root}: took over the lock of pid {a.pid} on host "
            f"{socket.gethostname()}") in c.stdout
    assert not (root / "jai_run.lock").exists() and (root / "iter_0000001").is_dir()
