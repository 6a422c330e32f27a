"""One run per save directory: ``ROOT/jai_run.lock``.

The lock is a small JSON file (host, pid, the process's start time, UTC start, command) created
atomically: written under a unique name, then hard-linked to the lock's name, which fails when a
lock exists (``link`` is atomic where ``O_EXCL`` is, NFS included, and a reader never sees a
half-written lock). Training's rank 0 takes it before anything of the run's directories is read
or written, and releases it on exit (normal, error, SIGTERM).

An existing lock:

* held by a live process on this host: refused (:class:`SaveDirLockError`, one line naming it);
* left by a process that is gone (same host; SIGKILL, a node reboot): taken over, with a note;
* held on another host: liveness cannot be checked from here, so ``force=True``
  (``--force-unlock``) is needed to take it over.
"""
from __future__ import annotations

import atexit
import json
import os
import signal
import socket
import sys
import time
import uuid
from dataclasses import dataclass
from typing import Optional

from megatron_jai.cli import UserError

LOCK_FILE = "jai_run.lock"


class SaveDirLockError(UserError):
    """A directory another run holds (one line naming the holder and the way out)."""


def lock_path(root: str) -> str:
    return os.path.join(root, LOCK_FILE)


def _start_time(pid: int) -> Optional[float]:
    try:
        import psutil

        return psutil.Process(pid).create_time()
    except Exception:  # noqa: BLE001 - gone, or not ours to inspect
        return None


def read_holder(root: str) -> Optional[dict]:
    """The lock's record, None when unlocked; ``{}`` for an unreadable lock file."""
    try:
        with open(lock_path(root)) as f:
            info = json.load(f)
        return info if isinstance(info, dict) else {}
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}


def holder_alive(info: dict) -> Optional[bool]:
    """True / False for a holder on this host; None when it cannot be told (another host, an
    unreadable lock)."""
    if not info or info.get("host") != socket.gethostname():
        return None
    pid = info.get("pid")
    if not isinstance(pid, int):
        return None
    try:
        import psutil

        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        started = info.get("process_start")
        # A pid reused by a later process is not the holder.
        return started is None or abs(proc.create_time() - started) < 1.0
    except Exception:  # noqa: BLE001 - psutil.NoSuchProcess and friends: gone
        return False


def describe(info: dict) -> str:
    if not info:
        return "an unreadable lock"
    return (f"pid {info.get('pid')} on host {info.get('host')}, started "
            f"{info.get('started_utc', '?')}")


@dataclass
class DirLock:
    """A lock this process holds; :meth:`release` removes it (and the directory, when the lock
    created it and nothing else was written there)."""

    root: str
    token: str
    created_root: bool
    _previous_sigterm: object = None

    def release(self) -> None:
        if not self.token:
            return
        info = read_holder(self.root)
        if info and info.get("token") == self.token:
            try:
                os.unlink(lock_path(self.root))
            except FileNotFoundError:
                pass
        if self.created_root:
            try:
                os.rmdir(self.root)
            except OSError:
                pass  # the run wrote something: keep it
        if self._previous_sigterm is not None:
            signal.signal(signal.SIGTERM, self._previous_sigterm)
        self.token = ""


def _record(token: str) -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "token": token,
            "process_start": _start_time(os.getpid()),
            "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "command": " ".join(sys.argv)[:500]}


def _try_create(root: str, token: str) -> bool:
    tmp = os.path.join(root, f".{LOCK_FILE}.{token}")
    with open(tmp, "w") as f:
        json.dump(_record(token), f)
        f.flush()
        os.fsync(f.fileno())
    try:
        os.link(tmp, lock_path(root))
        return True
    except FileExistsError:
        return False
    finally:
        os.unlink(tmp)


def _remove_stale(root: str, seen: dict) -> bool:
    """Remove the lock judged stale, unless another process replaced it in the meantime."""
    aside = lock_path(root) + f".stale-{uuid.uuid4().hex[:8]}"
    try:
        os.rename(lock_path(root), aside)
    except FileNotFoundError:
        return True
    with open(aside) as f:
        try:
            now = json.load(f)
        except ValueError:
            now = {}
    if now != seen:  # a newer holder raced us to it: put it back
        try:
            os.link(aside, lock_path(root))
        except FileExistsError:
            pass
        os.unlink(aside)
        return False
    os.unlink(aside)
    return True


def _exit_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)  # unwinds: ``finally`` blocks release the lock


def acquire(root: str, force: bool = False, flag: str = "--save") -> tuple:
    """Take ``root``'s lock. Returns ``(DirLock, notes)``; raises :class:`SaveDirLockError`.

    Until :meth:`DirLock.release` (called at exit at the latest), SIGTERM (when it would kill the
    process outright) exits through ``SystemExit`` so that the lock is released."""
    created = not os.path.isdir(root)
    os.makedirs(root, exist_ok=True)
    token = uuid.uuid4().hex
    notes = []
    for _ in range(3):
        if _try_create(root, token):
            lock = DirLock(root, token, created)
            atexit.register(lock.release)  # any exit but SIGKILL; release is idempotent
            if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
                lock._previous_sigterm = signal.signal(signal.SIGTERM, _exit_on_sigterm)
            return lock, notes
        info = read_holder(root)
        if info is None:
            continue  # released in between
        alive = holder_alive(info)
        if alive:
            raise SaveDirLockError(f"{flag} {root} is in use by another run ({describe(info)}; "
                                   f"lock {lock_path(root)}); wait for it to end or use another "
                                   f"directory")
        if alive is None and not force:
            raise SaveDirLockError(
                f"{flag} {root} is locked by {describe(info)} (lock {lock_path(root)}), which "
                f"cannot be checked from {socket.gethostname()}; if that run has ended, pass "
                f"--force-unlock")
        if _remove_stale(root, info):
            notes.append(f"note: {flag} {root}: took over the lock of {describe(info)}"
                         + (" (forced)" if alive is None else ", which is no longer running"))
    raise SaveDirLockError(f"{flag} {root}: could not take the lock {lock_path(root)} (another "
                           f"run is starting there at the same time)")


def live_holder(root: Optional[str]) -> Optional[dict]:
    """The record of a run holding ``root`` now (on this host, alive; or on another host)."""
    if not root or not os.path.isdir(root):
        return None
    info = read_holder(root)
    if info is None or holder_alive(info) is False:
        return None
    return info
