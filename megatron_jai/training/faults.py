"""Fault handling for long runs: user-facing errors, SIGTERM (pre-emption) and non-finite steps.

* :class:`TrainingError` is an error the user can fix (bad config, vocabulary mismatch, a run that
  keeps producing NaNs): a :class:`megatron_jai.cli.UserError` (and, as before, a RuntimeError).
  ``pretrain_jai.py`` prints it as one line and exits 2.
* :class:`PreemptionHandler` turns SIGTERM (Slurm pre-emption, ``scancel``) into a flag; the loop
  finishes the current step, agrees across ranks that a signal arrived, saves and exits 0.
* :class:`SkipTracker` counts steps skipped for a NaN/Inf loss or gradient and aborts after too many
  in a row.
* The TESTING flags' faults: a NaN loss (:func:`poison_loss`) and a save that dies, is signalled or
  finds the disk full half-way (:func:`testing_save_hook`).
"""
from __future__ import annotations

import os
import signal
from typing import Optional

from megatron_jai.cli import UserError


class TrainingError(UserError, RuntimeError):
    """A problem the user must fix; reported as one line without a traceback.

    ``rank_specific``: only some ranks see it (e.g. a bad token id in one data-parallel shard), so
    every rank that hits it prints it; otherwise only rank 0 prints.
    """

    def __init__(self, message: str, rank_specific: bool = False):
        super().__init__(message)
        self.rank_specific = rank_specific


class PreemptionHandler:
    """Records SIGTERM instead of dying, so the loop can save a checkpoint first."""

    def __init__(self, signals=(signal.SIGTERM,)):
        self.received: Optional[int] = None
        self._previous = {}
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.received = signum

    @property
    def requested(self) -> bool:
        return self.received is not None

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


class SkipTracker:
    """Counts non-finite steps: total, and in a row (a healthy step resets the streak)."""

    def __init__(self, max_in_a_row: int, total: int = 0):
        self.max_in_a_row = max_in_a_row
        self.total = total
        self.in_a_row = 0

    def record(self, skipped: bool) -> None:
        if not skipped:
            self.in_a_row = 0
            return
        self.total += 1
        self.in_a_row += 1

    def check(self, iteration: int) -> None:
        """Abort (TrainingError) when more than ``max_in_a_row`` steps in a row were skipped."""
        if self.in_a_row > self.max_in_a_row:
            raise TrainingError(
                f"{self.in_a_row} steps in a row had a NaN/Inf loss or gradient (last at iteration "
                f"{iteration}, --max-skipped-steps {self.max_in_a_row}); aborting. Resume from the "
                f"last checkpoint with a lower --lr or check the data.")


# ---- faults on request (the TESTING flags) -----------------------------------------------------
def poison_loss(loss_sum, stats) -> tuple:
    """``--inject-nan-at-step``: the micro-batch's loss (and its reported sum) become NaN."""
    loss_sum = loss_sum * float("nan")
    stats = stats.clone()
    stats[0] = loss_sum.detach()
    return loss_sum, stats


def testing_save_hook(args, iteration: int):
    """TESTING flags that act in the middle of a save (after the data, before the commit)."""
    if args.kill_during_save_at_step == iteration:
        def kill(tmp_dir):
            import psutil

            # Like a node failure: this process and its helpers (dist_checkpointing's writer
            # manager) die at once, leaving the unrenamed temporary directory behind.
            print(f"TESTING: killed while saving {tmp_dir}", flush=True)
            me = psutil.Process()
            for child in me.children(recursive=True):
                child.kill()
            me.kill()
        return kill
    if args.sigterm_during_save_at_step == iteration:
        return lambda tmp_dir: os.kill(os.getpid(), signal.SIGTERM)
    if args.full_disk_at_step == iteration:
        def full(tmp_dir):
            import errno

            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), tmp_dir)
        return full
    return None
