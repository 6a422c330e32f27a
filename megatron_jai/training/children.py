"""No orphans: every process a training rank starts dies with the rank, SIGKILL included.

What a rank starts, and how each one learns that the rank is gone:

* forked children (DataLoader workers, dist_checkpointing's per-bucket writer processes, which
  Megatron-Core forks during every save): a fork handler (:func:`os.register_at_fork`) gives each
  one the parent-death signal, ``prctl(PR_SET_PDEATHSIG, SIGKILL)``; DataLoader workers get it
  again from their ``worker_init_fn`` (:func:`die_with_parent`);
* the spawned ``multiprocessing`` manager that carries dist_checkpointing's write results (one per
  rank, started at its first save): started here with :func:`die_with_parent` as its initializer.
  Left to itself it outlives a killed rank for good, and with it the rank's resource tracker.

Torchrun's agent sends the rank's process group SIGTERM when a rank dies, but DataLoader workers
ignore SIGTERM (Slurm pre-emption) and forked writers inherit the rank's pre-emption handler;
nothing cleans up when the agent is gone too. The signal is Linux's; elsewhere this does nothing.
"""
from __future__ import annotations

import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1
_installed = False
_fork_parent = [0]  # the pid that forked (set in the parent, read in the child)


def die_with_parent(parent_pid: int | None = None) -> None:
    """Ask the kernel to SIGKILL this process when its parent dies; exit at once if the parent is
    already gone (it may die between the fork and this call). ``parent_pid``: the parent
    expected (default: the current one)."""
    if not sys.platform.startswith("linux"):
        return
    expected = os.getppid() if parent_pid is None else parent_pid
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
        return  # not permitted here: the rank's normal exit paths still end its children
    if os.getppid() != expected:
        os._exit(1)


def _before_fork() -> None:
    _fork_parent[0] = os.getpid()


def _after_fork_in_child() -> None:
    die_with_parent(_fork_parent[0])


def install() -> None:
    """Make this process's children die with it (once per process; idempotent)."""
    global _installed
    if _installed or not sys.platform.startswith("linux"):
        return
    _installed = True
    os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)
    _adopt_checkpoint_results_queue()


def _adopt_checkpoint_results_queue() -> None:
    """dist_checkpointing keeps one spawned manager process per rank for its write results,
    created at the first save by ``_get_write_results_queue``; ours is the same manager started
    with the parent-death signal."""
    try:
        from megatron.core.dist_checkpointing.strategies import filesystem_async
    except ImportError:
        return
    if getattr(filesystem_async._get_write_results_queue, "dies_with_rank", False):
        return

    def results_queue():
        if filesystem_async._results_queue is None:
            import multiprocessing
            from multiprocessing.managers import SyncManager

            manager = SyncManager(ctx=multiprocessing.get_context("spawn"))
            manager.start(initializer=die_with_parent, initargs=(os.getpid(),))
            filesystem_async._results_queue = manager.Queue()
        return filesystem_async._results_queue

    results_queue.dies_with_rank = True
    filesystem_async._get_write_results_queue = results_queue
