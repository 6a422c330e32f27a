"""Stages of a replication run: each one calls the project's own command lines, in this process
(``main(argv)`` through :func:`megatron_jai.cli.run`, the way their ``__main__`` does; one
interpreter start-up for the whole chain), with everything they print going to ``DIR/logs/<stage>.log``.

A finished stage leaves ``DIR/stages/<stage>.json`` (its wall time and what it produced); a rerun
keeps every finished stage and runs the others. Training stages save into a root that they also
``--load``, so an interrupted training stage continues from its last checkpoint.
"""
from __future__ import annotations

import contextlib
import gc
import importlib.util
import json
import os
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Callable, List, Optional

from megatron_jai import cli
from megatron_jai.paths import REPO_ROOT


class StageError(cli.UserError):
    """A stage's tool failed (one line naming the stage, the tool's error and the log)."""


_MODULES: dict = {}


def entry_module(script: str):
    """``pretrain_jai.py``, ``posttrain_jai.py`` or ``tools/<name>.py`` of this repository, loaded
    once as a module (its ``__main__`` guard keeps it from running)."""
    if script not in _MODULES:
        path = os.path.join(REPO_ROOT, script)
        spec = importlib.util.spec_from_file_location(
            "replication_" + os.path.basename(script)[:-3], path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _MODULES[script] = module
    return _MODULES[script]


@contextlib.contextmanager
def output_to(path: str):
    """Send this process's stdout and stderr (file descriptors 1 and 2: Python, C libraries and
    child processes alike) to the end of ``path``."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(path, "ab") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)


@dataclass
class Stage:
    name: str
    what: str  # one line for the progress output
    fn: Callable[[], Optional[dict]]  # runs the stage; returns what to record


class StageRunner:
    """Runs stages in order, skipping finished ones; prints one line per stage."""

    def __init__(self, out_dir: str, stream=None):
        self.out_dir = out_dir
        self.stream = stream or sys.stdout
        self.state_dir = os.path.join(out_dir, "stages")
        self.log_dir = os.path.join(out_dir, "logs")
        os.makedirs(self.state_dir, exist_ok=True)
        os.makedirs(self.log_dir, exist_ok=True)
        self.current: Optional[str] = None
        self.rows: List[tuple] = []  # (stage, "ran" | "kept", seconds)

    def record_path(self, name: str) -> str:
        return os.path.join(self.state_dir, f"{name}.json")

    def record(self, name: str) -> Optional[dict]:
        path = self.record_path(name)
        if not os.path.isfile(path):
            return None
        with open(path, encoding="utf-8") as f:
            return json.load(f)

    def run_all(self, stages: List[Stage]) -> None:
        width = len(str(len(stages)))
        for i, stage in enumerate(stages, 1):
            head = f"[{i:>{width}}/{len(stages)}] {stage.name}"
            done = self.record(stage.name)
            if done is not None:
                self.rows.append((stage.name, "kept", done["seconds"]))
                print(f"{head}: kept ({done['seconds']:.1f} s when it ran)", file=self.stream,
                      flush=True)
                continue
            if getattr(self.stream, "isatty", lambda: False)():
                print(f"{head}: {stage.what} ...", end="\r", file=self.stream, flush=True)
            self.current = stage.name
            t0, cpu0 = time.time(), cpu_seconds()
            info = stage.fn() or {}
            seconds = time.time() - t0
            self.current = None
            gc.collect()
            _write_json(self.record_path(stage.name), {
                "stage": stage.name, "seconds": seconds, "cpu_seconds": cpu_seconds() - cpu0,
                "finished": time.time(), **info})
            self.rows.append((stage.name, "ran", seconds))
            print(f"{head}: {stage.what} ({seconds:.1f} s)", file=self.stream, flush=True)

    def tool(self, script: str, *argv) -> None:
        """Run ``script argv`` (``tools/x.py``, ``pretrain_jai.py``, ``posttrain_jai.py``) in this
        process, its output appended to the current stage's log; a non-zero exit is a
        :class:`StageError`."""
        argv = [str(a) for a in argv]
        log = os.path.join(self.log_dir, f"{self.current or 'tool'}.log")
        prog = os.path.basename(script)
        with open(log, "a", encoding="utf-8") as f:
            f.write(f"$ {script} {' '.join(argv)}\n")
        hook = sys.excepthook  # torch.distributed wraps it at every process-group start
        with output_to(log):
            try:
                rc = cli.run(prog, entry_module(script).main, argv)
            except Exception:  # noqa: BLE001 - a tool's bug: its traceback goes to the log
                traceback.print_exc()
                rc = None
            finally:
                sys.excepthook = hook
        if rc in (cli.EXIT_INTERRUPTED, cli.EXIT_TERMINATED):
            raise KeyboardInterrupt
        if rc != 0:
            status = "raised an exception" if rc is None else f"exited with status {rc}"
            raise StageError(f"stage {self.current}: {prog} {status}: {_last_line(log)} "
                             f"(log: {log})")


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (what the wall time of a stage would
    be on an idle machine, one thread)."""
    import resource

    return sum(u.ru_utime + u.ru_stime for u in (resource.getrusage(resource.RUSAGE_SELF),
                                                 resource.getrusage(resource.RUSAGE_CHILDREN)))


def _last_line(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = [line.strip() for line in f if line.strip()]
    errors = [line for line in lines if ": error:" in line]
    return (errors or lines or ["no output"])[-1]


def _write_json(path: str, obj) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, ensure_ascii=False)
        f.write("\n")
    os.replace(tmp, path)
