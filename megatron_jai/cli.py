"""What every command line of the project shares: one error type, one exit-code convention, quiet
library warnings.

Exit codes (every tool and entry script):

* ``0``   success;
* ``1``   the job ran and a check it performs failed (``compare_logits`` over tolerance, a
  benchmark's ``--check``);
* ``2``   bad input or usage: one line ``PROG: error: ...`` on stderr, nothing written
  (argparse uses 2 for usage errors too);
* ``130`` interrupted (Ctrl-C), ``143`` terminated (SIGTERM); partial outputs are removed.

A tool's ``main`` raises :class:`UserError` (or a subclass: every package error type derives from
it) for anything the user can fix; :func:`run` turns it into the one line and the exit code.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import warnings
from typing import Callable, Optional, Sequence

EXIT_OK = 0
EXIT_CHECK_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143


class UserError(ValueError):
    """A problem the user can fix (bad input, a missing file, a wrong flag): one line, exit 2."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """``--help`` with a flag's default where it says something: not for ``None``/``False``
    defaults, nor for a switch (``--no-x`` defaults to True: it says nothing), nor when the help
    text already names its default."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS) \
                or action.option_strings == [] or isinstance(action.default, list) \
                or action.nargs == 0:
            return text
        return text + " (default: %(default)s)"


def add_layout_arguments(parser, note: str = "") -> None:
    """The parallel layout a tool loads a checkpoint at: ``--tp --pp --ep`` and an uneven pipeline
    split (any layout loads any checkpoint: tensors are stored with global shapes)."""
    a = parser.add_argument
    a("--tp", type=int, default=1, help=f"tensor parallel size{note}")
    a("--pp", type=int, default=1, help=f"pipeline parallel size{note}")
    a("--ep", type=int, default=1, help=f"expert parallel size{note}")
    a("--first-stage-layers", type=int, default=None,
      help="layers on the first pipeline stage (uneven split, PP >= 2)")
    a("--last-stage-layers", type=int, default=None,
      help="layers on the last pipeline stage (uneven split, PP >= 2)")


def read_yaml(path: str, error: type = UserError, what: str = "settings") -> dict:
    """The mapping a YAML file holds (an empty file: ``{}``), or ``error`` with one line why not."""
    import yaml

    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except OSError as err:
        raise error(f"cannot read config {path}: {err.strerror}") from None
    except yaml.YAMLError as err:
        raise error(f"config {path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise error(f"config {path} must be a mapping of {what}")
    return data


def quiet_warnings() -> None:
    """Silence the library warnings a user cannot act on (Megatron-Core's TE/apex fallbacks and
    deprecations, torch's ShardedTensor/``load_state_dict`` FutureWarnings, transformers' notices).
    ``JAI_SHOW_WARNINGS=1`` shows them again."""
    if os.environ.get("JAI_SHOW_WARNINGS"):
        return
    for category in (UserWarning, FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category)
    if not os.environ.get("PYTHONWARNINGS"):  # the same in worker processes (dist_checkpointing's)
        os.environ["PYTHONWARNINGS"] = \
            "ignore::UserWarning,ignore::FutureWarning,ignore::DeprecationWarning"
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    for name in ("megatron", "megatron.core", "transformers", "torch.distributed.checkpoint"):
        logging.getLogger(name).setLevel(logging.ERROR)


def run(prog: str, main: Callable[[Optional[Sequence[str]]], int],
        argv: Optional[Sequence[str]] = None, user_errors: tuple = ()) -> int:
    """Call ``main(argv)`` and map its failures to the project's exit codes.

    ``user_errors``: extra exception types (beyond :class:`UserError` and ``OSError``, e.g. a full
    disk) that are reported as one line with exit 2.
    """
    quiet_warnings()
    terminated = []

    def on_sigterm(*_):  # unwind like Ctrl-C, so ``finally`` blocks remove temporary outputs
        terminated.append(True)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        return int(main(argv) or 0)
    except (UserError, OSError, *user_errors) as err:
        print(f"{prog}: error: {_one_line(err)}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{prog}: error: {'terminated' if terminated else 'interrupted'}; no output written",
              file=sys.stderr, flush=True)
        return EXIT_TERMINATED if terminated else EXIT_INTERRUPTED
    finally:
        signal.signal(signal.SIGTERM, previous)


def _one_line(err: BaseException) -> str:
    if isinstance(err, OSError) and err.strerror and err.filename:
        return f"{err.filename}: {err.strerror}"
    text = str(err) or type(err).__name__
    return " ".join(text.split())


class _ProgressLines:
    """Progress for a log file: a plain line ``DESC: N/TOTAL UNIT (P%), S s`` on stderr at most
    every ``interval`` seconds (no carriage returns, no bar), nothing for short work."""

    def __init__(self, iterable=None, total=None, desc: str = "", unit: str = "it",
                 interval: float = 60.0, **_):
        import time

        self.iterable, self.total, self.desc, self.unit = iterable, total, desc, unit.strip()
        self.interval, self.n, self._clock = interval, 0, time.monotonic
        self._start = self._last = self._clock()
        if self.total is None and hasattr(iterable, "__len__"):
            self.total = len(iterable)

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)

    def update(self, n: int = 1) -> None:
        self.n += n
        now = self._clock()
        if now - self._last >= self.interval:
            self._last = now
            done = f"{self.n:,}/{self.total:,}" if self.total else f"{self.n:,}"
            share = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
            print(f"{self.desc}: {done} {self.unit}{share}, {now - self._start:.0f} s",
                  file=sys.stderr, flush=True)

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress(iterable=None, enabled: bool = True, log_interval: float = 60.0, **kwargs):
    """The progress of long work: a ``tqdm`` bar when stderr is a terminal, plain lines every
    ``log_interval`` seconds when it is a log file (:class:`_ProgressLines`), nothing when
    ``enabled`` is false (``--no-progress``, ranks other than the one that reports). ``kwargs`` are
    tqdm's (``total``, ``desc``, ``unit``, ...)."""
    from tqdm import tqdm

    if not enabled:
        return tqdm(iterable, disable=True, **kwargs)
    if not sys.stderr.isatty():
        return _ProgressLines(iterable, interval=log_interval, **kwargs)
    return tqdm(iterable, dynamic_ncols=True, **kwargs)
