"""File helpers shared by the data modules: the cache directory, an inter-process lock, and
reading JSON-lines files (plain or gzip) with byte progress."""
from __future__ import annotations

import contextlib
import fcntl
import gzip
import os
from typing import Iterator, Tuple

from megatron_jai.paths import REPO_ROOT


def default_cache_dir() -> str:
    """``$JAI_CACHE_DIR``, else ``.cache`` in the repository (git-ignored). Dataset index caches and
    the demo corpus live here, never next to (possibly read-only) data."""
    return os.path.abspath(os.environ.get("JAI_CACHE_DIR", os.path.join(REPO_ROOT, ".cache")))


@contextlib.contextmanager
def file_lock(path: str):
    """Exclusive ``flock`` on ``path`` (created if needed): serialises processes on one node, e.g.
    the ranks of a torchrun job building the same cache."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def is_gzip(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == b"\x1f\x8b"


def iter_lines(path: str) -> Iterator[Tuple[bytes, int]]:
    """Yield ``(raw line bytes, compressed bytes consumed so far)`` for a plain or gzip file.
    A truncated or corrupt gzip stream raises ``EOFError`` / ``gzip.BadGzipFile`` / ``zlib.error``."""
    with open(path, "rb") as raw:
        stream = gzip.GzipFile(fileobj=raw, mode="rb") if is_gzip(path) else raw
        with stream:
            for line in stream:
                yield line, raw.tell()
