"""Checkpoint integrity: a manifest of every file of an iteration directory, written last.

``iter_N/jai_manifest.json`` lists each file's relative path, size and CRC32 (streamed in 8 MiB
chunks; files checksummed in parallel by a thread pool, since ``zlib.crc32`` releases the GIL).
Training saves and every tool that writes a Megatron checkpoint write it after the data and before
the rename that makes the iteration complete; everything that reads a checkpoint into a model
verifies it first. Verification reads the files once, without torch.

* :func:`write` / :func:`check` (one directory) and :func:`newest_verifying` (a root's newest
  iteration that verifies: the way out named by every integrity error);
* :func:`verify_for_reading`: what readers call; raises :class:`CheckpointIntegrityError`, one
  line naming the file, what is wrong and the newest iteration that verifies;
* an iteration without a manifest (saved before manifests existed) is read unverified with a note,
  unless its ``common.pt`` says that a manifest was written (:data:`COMMON_KEY`): then the manifest
  was deleted, which is an error like any other missing file.

``share``: a callable ``share(directory, names) -> {name: entry}`` that may spread the checksums
over processes (training: every rank takes a slice); the default computes them all here.
"""
from __future__ import annotations

import json
import os
import re
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Optional

from megatron_jai.cli import UserError

MANIFEST_FILE = "jai_manifest.json"
FORMAT = "jai-checkpoint-manifest-1"
# Set in the common state of every checkpoint saved with a manifest, so that a deleted manifest is
# not taken for an old checkpoint.
COMMON_KEY = "jai_manifest"
_CHUNK = 8 << 20
ITER_DIR = re.compile(r"^iter_(\d{7})$")
# Files a network filesystem or an editor may leave that are no part of the checkpoint.
_IGNORED = re.compile(r"^(\.nfs.*|.*~)$")


class CheckpointIntegrityError(UserError):
    """A checkpoint iteration whose files do not match its manifest (one line: file, what is
    wrong, the newest iteration that verifies)."""


def default_threads() -> int:
    return min(8, os.cpu_count() or 1)


def list_files(directory: str) -> list:
    """Relative paths of the files under ``directory``, sorted; the manifest itself excluded."""
    names = []
    for base, dirs, files in os.walk(directory):
        dirs.sort()
        for name in files:
            if name.startswith(MANIFEST_FILE) or _IGNORED.match(name):
                continue
            names.append(os.path.relpath(os.path.join(base, name), directory))
    return sorted(names)


def file_entry(path: str) -> dict:
    """``{"size", "crc32"}`` of one file, read in chunks."""
    crc, size = 0, 0
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(_CHUNK)
        view = memoryview(buf)
        while True:
            n = f.readinto(buf)
            if not n:
                break
            crc = zlib.crc32(view[:n], crc)
            size += n
    return {"size": size, "crc32": f"{crc & 0xFFFFFFFF:08x}"}


def checksum(directory: str, names, threads: Optional[int] = None) -> dict:
    """``{name: entry}`` for ``names`` under ``directory``; files that are gone are left out."""
    def one(name):
        try:
            return name, file_entry(os.path.join(directory, name))
        except FileNotFoundError:
            return name, None

    names = list(names)
    with ThreadPoolExecutor(max(1, min(threads or default_threads(), len(names) or 1))) as pool:
        return {n: e for n, e in pool.map(one, names) if e is not None}


def _local_share(directory: str, names) -> dict:
    return checksum(directory, names)


def write(directory: str, entries: Optional[dict] = None) -> dict:
    """Write the manifest of ``directory`` (temporary file, fsync, rename). Returns it.
    ``entries``: the checksums when computed elsewhere (several processes); default here."""
    if entries is None:
        entries = checksum(directory, list_files(directory))
    manifest = {"format": FORMAT, "algorithm": "crc32", "written_utc":
                time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "files": entries}
    path = os.path.join(directory, MANIFEST_FILE)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return manifest


@dataclass
class Verdict:
    ok: bool  # everything matches the manifest
    unverified: bool = False  # no manifest, and none was written: an older checkpoint
    problem: str = ""  # "FILE: what is wrong" when not ok


def _had_manifest(directory: str) -> bool:
    """Whether the iteration's common state says a manifest was written with it."""
    path = os.path.join(directory, "common.pt")
    if not os.path.isfile(path):
        return False
    try:
        import torch

        common = torch.load(path, map_location="cpu", weights_only=False)
    except Exception:  # noqa: BLE001 - an unreadable common.pt says nothing either way
        return False
    return isinstance(common, dict) and bool(common.get(COMMON_KEY))


def check(directory: str, share: Optional[Callable] = None) -> Verdict:
    """Compare ``directory`` with its manifest: missing, truncated, grown, changed and extra
    files. The first problem found is reported (the manifest's order: sorted paths)."""
    path = os.path.join(directory, MANIFEST_FILE)
    if not os.path.isdir(directory):
        return Verdict(False, problem=f"{directory}: the directory does not exist")
    if not os.path.isfile(path):
        if _had_manifest(directory):
            return Verdict(False, problem=f"{path}: missing (the checkpoint was saved with one; "
                                          f"it was deleted)")
        return Verdict(False, unverified=True)
    try:
        with open(path) as f:
            manifest = json.load(f)
        expected = manifest["files"]
        if manifest.get("format") != FORMAT or not isinstance(expected, dict):
            raise ValueError(f"unknown format {manifest.get('format')!r}")
    except (OSError, ValueError, KeyError, TypeError) as err:
        return Verdict(False, problem=f"{path}: unreadable manifest ({err})")
    present = set(list_files(directory))
    for name in sorted(expected):
        if name not in present:
            return Verdict(False, problem=f"{os.path.join(directory, name)}: missing")
        size, want = os.path.getsize(os.path.join(directory, name)), expected[name]["size"]
        if size != want:
            what = "truncated" if size < want else "longer than written"
            return Verdict(False, problem=f"{os.path.join(directory, name)}: {what} ({size} "
                                          f"bytes, the manifest says {want})")
    extra = sorted(present - set(expected))
    if extra:
        return Verdict(False, problem=f"{os.path.join(directory, extra[0])}: not in the manifest "
                                      f"(added after the checkpoint was written)")
    found = (share or _local_share)(directory, sorted(expected))
    for name in sorted(expected):
        got, want = found.get(name), expected[name]
        if got is None:
            return Verdict(False, problem=f"{os.path.join(directory, name)}: missing")
        if got["crc32"] != want["crc32"] or got["size"] != want["size"]:
            return Verdict(False, problem=f"{os.path.join(directory, name)}: contents changed "
                                          f"(CRC32 {got['crc32']}, the manifest says "
                                          f"{want['crc32']})")
    return Verdict(True)


def iteration_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def iterations(root: str) -> list:
    """Complete iteration directories under ``root``, ascending."""
    if not root or not os.path.isdir(root):
        return []
    return sorted(int(m.group(1)) for m in map(ITER_DIR.match, os.listdir(root)) if m)


def newest_verifying(root: str, exclude=(), share: Optional[Callable] = None) -> Optional[int]:
    """The newest iteration under ``root`` whose manifest verifies (older unmanifested ones do
    not count: nothing vouches for them)."""
    for it in reversed(iterations(root)):
        if it not in exclude and check(iteration_dir(root, it), share).ok:
            return it
    return None


def resume_hint(root: str, it: int) -> str:
    return f"resume it with --load-iteration {it}"


def path_hint(root: str, it: int) -> str:
    return f"read it as {iteration_dir(root, it)}"


def tracker_hint(root: str, it: int) -> str:
    return f"write {it} into {os.path.join(root, 'latest_checkpointed_iteration.txt')} to use it"


def way_out(root: str, failed: Optional[int], hint: Callable[[str, int], str],
            share: Optional[Callable] = None) -> str:
    """``the newest iteration under ROOT that verifies is N (HINT)``, or that none does."""
    good = newest_verifying(root, exclude=() if failed is None else (failed,), share=share)
    if good is None:
        return f"no other iteration under {root} verifies"
    return f"the newest iteration under {root} that verifies is {good} ({hint(root, good)})"


_verified: dict = {}  # (realpath, manifest mtime) of directories verified by this process
_noted: dict = {}  # directories without a manifest this process has said so about once


def _cache_key(directory: str):
    try:
        st = os.stat(os.path.join(directory, MANIFEST_FILE))
    except OSError:
        return None
    return os.path.realpath(directory), st.st_mtime_ns, st.st_size


def is_verified(directory: str) -> bool:
    """Whether this process has verified ``directory`` (and its manifest is unchanged since)."""
    key = _cache_key(directory)
    return key is not None and key in _verified


def verify_for_reading(directory: str, hint: Callable[[str, int], str] = path_hint,
                       share: Optional[Callable] = None, note: Optional[Callable] = None,
                       use_cache: bool = True) -> bool:
    """Verify an iteration directory before it is read into a model. Returns True when verified,
    False for an older checkpoint without a manifest (``note`` gets one line, default stderr on
    rank 0). Raises :class:`CheckpointIntegrityError` (one line) otherwise.

    ``use_cache``: skip a directory this process verified before; a collective ``share`` must
    not (the ranks' caches may differ: the caller agrees on it first)."""
    if use_cache and is_verified(directory):
        return True
    key = _cache_key(directory)
    verdict = check(directory, share)
    if verdict.ok:
        if key is not None:
            _verified[key] = True
        return True
    if verdict.unverified:
        if _noted.get(os.path.realpath(directory)):
            return False
        _noted[os.path.realpath(directory)] = True
        line = f"note: {directory} has no {MANIFEST_FILE} (saved before checkpoints had " \
               f"manifests); read without verification"
        if note is not None:
            note(line)
        elif os.environ.get("RANK", "0") == "0":
            print(line, file=sys.stderr, flush=True)
        return False
    root, name = os.path.split(os.path.normpath(directory))
    match = ITER_DIR.match(name)
    failed = int(match.group(1)) if match else None
    raise CheckpointIntegrityError(f"{verdict.problem}; {way_out(root, failed, hint, share)}")
