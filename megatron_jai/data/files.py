"""File helpers shared by the data modules: the cache directory, an inter-process lock, reading
lines of plain or gzip files with byte progress, and reading documents (JSON lines or plain
text) for tokenizer training, tokens-per-character tables and evaluation."""
from __future__ import annotations

import contextlib
import fcntl
import gzip
import json
import os
import zlib
from typing import Iterator, Tuple

from megatron_jai.data.tokenizer import TokenizerError
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


def is_jsonl(path: str) -> bool:
    name = path[:-3] if path.endswith(".gz") else path
    return name.endswith((".jsonl", ".json"))


def iter_documents(path: str, json_key: str = "text") -> Iterator[str]:
    """Documents of a jsonl(.gz) file (field ``json_key``), or lines of a plain text(.gz) file."""
    if not os.path.isfile(path):
        raise TokenizerError(f"no such file: {path}")
    jsonl = is_jsonl(path)
    lineno = 0
    try:
        for lineno, (raw, _) in enumerate(iter_lines(path), 1):
            line = raw.decode("utf-8").rstrip("\r\n")
            if not jsonl:
                yield line
                continue
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise TokenizerError(f"{path}:{lineno}: not JSON ({e.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get(json_key), str):
                raise TokenizerError(f"{path}:{lineno}: no text field {json_key!r}")
            yield record[json_key]
    except (UnicodeDecodeError, EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise TokenizerError(f"{path}:{lineno + 1}: unreadable ({e})") from None
