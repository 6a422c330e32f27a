"""Issue 16, item 4: every process a rank starts (DataLoader workers, dist_checkpointing's writer
processes and its spawned results manager) dies within 10 s of the rank, SIGKILL included, even
when no launcher is left to clean up."""
import os
import subprocess
import sys
import time

import psutil
import pytest

from conftest import REPO_ROOT, free_port
from train_helpers import small_corpus

pytestmark = pytest.mark.dist

PRETRAIN = os.path.join(REPO_ROOT, "pretrain_jai.py")


def _ranks(agent):
    return [p for p in agent.children() if "pretrain_jai.py" in " ".join(_cmdline(p))]


def _cmdline(p):
    try:
        return p.cmdline()
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return []


def test_sigkill_mid_save_leaves_no_process(shared_dir, tmp_path):
    corpus = small_corpus(shared_dir)
    root = tmp_path / "ckpt"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO_ROOT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           f"--master_port={free_port()}", PRETRAIN, "--data-path", corpus["english"],
           "--tokenizer", corpus["tokenizer"], "--global-batch-size", "4",
           "--micro-batch-size", "2", "--seq-length", "32", "--train-iters", "1000",
           "--num-workers", "1", "--save", str(root), "--save-interval", "2",
           "--log-interval", "1", "--data-cache-dir", str(tmp_path / "cache")]
    agent_proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
    agent = psutil.Process(agent_proc.pid)
    run = []
    try:
        deadline = time.time() + 240
        while time.time() < deadline and agent_proc.poll() is None:
            ranks = _ranks(agent)
            names = os.listdir(root) if root.is_dir() else []
            # Mid-save, a save after the first: the writers' results manager (started by the
            # first save) is up and serving, not still starting.
            saving = "iter_0000002" in names and any(n.endswith(".tmp") for n in names)
            if saving and len(ranks) == 2 and all(
                    any("spawn_main" in " ".join(_cmdline(c)) for c in r.children())
                    for r in ranks):
                run = agent.children(recursive=True)
                agent.kill()  # no launcher left to clean up (srun, a dead agent)
                for r in reversed(ranks):
                    r.kill()
                break
            time.sleep(0.02)
        else:
            pytest.fail("the run never reached a save with its writer processes")
        helpers = [p for p in run if p not in ranks]
        assert helpers, "no process started by a rank was seen"
        deadline = time.time() + 10
        while time.time() < deadline and any(_alive(p) for p in run):
            time.sleep(0.2)
        left = [f"{p.pid} {' '.join(_cmdline(p))[:120]}" for p in run if _alive(p)]
        assert not left, "still running 10 s after their rank died:\n" + "\n".join(left)
    finally:
        for p in [agent, *run]:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        agent_proc.wait(timeout=30)


def _alive(p):
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
