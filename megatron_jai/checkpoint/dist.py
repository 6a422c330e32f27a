"""Megatron-Core distributed checkpoints (``dist_checkpointing``, torch_dist format).

Layout of a checkpoint root ``M/`` (Megatron-LM's, plus the architecture and the tokenizer)::

    M/model_config.json                  the ModelConfig of the tracked iteration
    M/latest_checkpointed_iteration.txt  the newest complete iteration (the tracker)
    M/iter_0000100/                      one dist_checkpointing directory per saved iteration
    M/tokenizer/                         the tokenizer the model was trained with (if known)

Nothing is ever lost to a crash:

* an iteration is written to ``iter_N.tmp`` and renamed when every rank has finished, so a
  directory named ``iter_N`` is always complete;
* re-saving an existing iteration moves the old directory aside (``iter_N.old``), renames the new
  one in, updates the tracker, and only then deletes the old one; a crash in between is repaired by
  :func:`recover_interrupted_commit` (the old directory comes back);
* the tracker is written to a temporary file, fsynced and renamed, and its directory fsynced;
* every iteration directory gets a manifest (:mod:`~megatron_jai.checkpoint.manifest`: each
  file's size and CRC32), written last, before the rename; readers verify it first;
* a full disk, in any of the forms it takes on any rank (:func:`is_disk_full`), is a one-line
  error naming the path; every rank removes the partial ``.tmp`` and the previous checkpoint
  stays as it was.

Sharded tensors are stored in their global shape, so any TP/PP/EP can load them.
"""
from __future__ import annotations

import errno
import os
import shutil
import time
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist

from megatron_jai.checkpoint import manifest
from megatron_jai.cli import UserError
from megatron_jai.config import ModelConfig

TRACKER_FILE = "latest_checkpointed_iteration.txt"
CONFIG_FILE = "model_config.json"
TOKENIZER_SUBDIR = "tokenizer"  # the tokenizer the model was trained with / a vocab surgery gave it
_OLD_SUFFIX = ".old"  # an iteration directory moved aside while its replacement is renamed in
_TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                    "special_tokens_map.json", "added_tokens.json", "vocab_map.json",
                    "vocab.json", "merges.txt", "chat_template.jinja")


class CheckpointError(UserError):
    """A checkpoint root that cannot be used as it is (one line, names what to do)."""


iteration_dir = manifest.iteration_dir
complete_iterations = manifest.iterations  # complete iteration directories, found by scanning


def latest_iteration(root: str) -> Optional[int]:
    """The tracked iteration, None without a tracker. An empty or unreadable tracker is a
    :class:`CheckpointError` naming the newest iteration that verifies."""
    path = os.path.join(root, TRACKER_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            text = f.read().strip()
        return int(text)
    except (OSError, ValueError, UnicodeDecodeError):
        raise CheckpointError(f"{path} is empty or unreadable; {suggest_iteration(root)}") from None


def suggest_iteration(root: str, exclude=(), share=None) -> str:
    """Where a run can resume when the tracker cannot say: the newest iteration that verifies
    against its manifest, else the newest complete one without a manifest (older checkpoints)."""
    for it in reversed(complete_iterations(root)):
        if it in exclude:
            continue
        verdict = manifest.check(iteration_dir(root, it), share)
        if verdict.ok or verdict.unverified:
            what = "that verifies" if verdict.ok else "(saved without a manifest: unverified)"
            return (f"the newest complete iteration under {root} {what} is {it} (resume it with "
                    f"--load-iteration {it}, or write {it} into the tracker)")
    return f"no complete iteration under {root} verifies"


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems (e.g. network ones) refuse fsync on directories
    finally:
        os.close(fd)


def write_tracker(root: str, iteration: int) -> None:
    """Atomically point the tracker at ``iteration`` (fsync file, rename, fsync directory)."""
    tmp = os.path.join(root, TRACKER_FILE + ".tmp")
    with open(tmp, "w") as f:
        f.write(f"{iteration}\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(root, TRACKER_FILE))
    _fsync_dir(root)


def recover_interrupted_commit(root: str) -> list:
    """Repair what a crash in the middle of :func:`commit_iteration` left: an ``iter_N.old``
    without ``iter_N`` is put back; one beside a complete ``iter_N`` is deleted. Returns the
    repaired iterations. Rank 0 only."""
    if not os.path.isdir(root):
        return []
    repaired = []
    for name in sorted(os.listdir(root)):
        if not (name.startswith("iter_") and name.endswith(_OLD_SUFFIX)):
            continue
        old = os.path.join(root, name)
        final = old[: -len(_OLD_SUFFIX)]
        if os.path.isdir(final):
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(old, final)
            repaired.append(int(os.path.basename(final)[5:]))
    if repaired:
        _fsync_dir(root)
    return repaired


def commit_iteration(root: str, iteration: int, tmp: str, cfg: Optional[ModelConfig] = None,
                     between: Optional[Callable[[str], None]] = None) -> str:
    """Make the complete ``tmp`` directory iteration ``iteration`` of ``root`` and track it.

    An existing ``iter_N`` is moved aside first and deleted only once the new one is in place and
    tracked. ``between(stage)`` is a test hook called at each stage. Rank 0 only."""
    final = iteration_dir(root, iteration)
    old = final + _OLD_SUFFIX
    recover_interrupted_commit(root)
    if os.path.exists(final):
        os.replace(final, old)
        if between:
            between("moved-aside")
    os.replace(tmp, final)
    if between:
        between("renamed")
    # The root's config describes the tracked iteration: written with it, not before the data
    # (a save killed half-way must not leave a newer config, e.g. another RoPE, behind).
    if cfg is not None:
        cfg.save(os.path.join(root, CONFIG_FILE))
    write_tracker(root, iteration)
    if os.path.exists(old):
        shutil.rmtree(old)
    return final


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _model_sharded_state_dict(model_chunks: Sequence[torch.nn.Module]) -> dict:
    if len(model_chunks) == 1:
        return {"model": model_chunks[0].sharded_state_dict()}
    return {f"model{i}": m.sharded_state_dict() for i, m in enumerate(model_chunks)}


# What a full disk looks like when it is not an OSError: torch's zip writer (torch.save of
# common.pt, of a .distcp record) fails an enforce in caffe2's inline_container.cc, and
# Megatron-Core's writer processes hand back their OSError as text.
_DISK_FULL_TEXT = ("No space left on device", "Disk quota exceeded", "[Errno 28]", "[Errno 122]",
                   "PytorchStreamWriter failed writing file")
_DISK_FULL_KEY = "jai/disk_full_during_save"  # set in the job's store by the rank that saw it


def is_disk_full(err: BaseException) -> bool:
    """Whether ``err`` is ENOSPC / EDQUOT in any of its forms: an OSError anywhere in the
    exception chain (``__cause__``, ``__context__``, exceptions carried in ``args``), a
    torch.distributed.checkpoint ``CheckpointException`` wrapping per-rank failures, a writer
    process's failure re-raised as text, torch's ``inline_container.cc`` enforce failures."""
    seen, todo = set(), [err]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if isinstance(e, BaseException):
            try:
                text = str(e)
            except Exception:  # noqa: BLE001 - a malformed wrapper still has its causes
                text = ""
            if any(marker in text for marker in _DISK_FULL_TEXT) or \
                    ("inline_container.cc" in text and "unexpected pos" in text):
                return True
            todo += [e.__cause__, e.__context__]
            todo += [a for a in getattr(e, "args", ()) if isinstance(a, BaseException)]
        failures = getattr(e, "failures", None)  # torch.distributed.checkpoint.CheckpointException
        if isinstance(failures, dict):
            for v in failures.values():  # a rank's failure, or (exception, traceback) pairs
                todo += [x for x in (v if isinstance(v, (tuple, list)) else (v,))
                         if isinstance(x, BaseException)]
    return False


def _job_store():
    try:
        from torch.distributed import distributed_c10d

        return distributed_c10d._get_default_store() if dist.is_initialized() else None
    except Exception:  # noqa: BLE001 - no store: each rank decides alone
        return None


def _announce_disk_full() -> None:
    """Tell the other ranks (stuck in a collective with this one) why their save fails."""
    store = _job_store()
    if store is not None:
        try:
            store.set(_DISK_FULL_KEY, str(_rank()))
        except Exception:  # noqa: BLE001 - best effort: the store may be gone already
            pass


PEER_WAIT_S = 10.0  # how long a failing rank waits to hear that another one found the disk full


def _peer_saw_disk_full() -> bool:
    """Whether another rank reported a full disk (waiting a little: DCP raises on every rank at
    once, with the failure's details only on the coordinator)."""
    store = _job_store()
    if store is None:
        return False
    deadline = time.monotonic() + PEER_WAIT_S
    while True:  # polled: store.wait's timeout logs a C++ warning
        try:
            if store.check([_DISK_FULL_KEY]):
                return True
        except Exception:  # noqa: BLE001 - the store is gone
            return False
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.2)


def checksum_across_ranks(directory: str, names: Sequence[str]) -> dict:
    """Manifest entries of ``names``, each rank checksumming a slice (one gather). Collective when
    torch.distributed is initialised; ``names`` must be the same on every rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return manifest.checksum(directory, names)
    rank, world = dist.get_rank(), dist.get_world_size()
    parts = [None] * world
    dist.all_gather_object(parts, manifest.checksum(directory, list(names)[rank::world]))
    merged = {}
    for part in parts:
        merged.update(part)
    return merged


def _write_manifest(directory: str) -> None:
    """Collective: the file list from rank 0, the checksums from every rank, the file by rank 0."""
    names = [manifest.list_files(directory) if _rank() == 0 else None]
    if dist.is_initialized():
        dist.broadcast_object_list(names, src=0)
    entries = checksum_across_ranks(directory, names[0])
    if _rank() == 0:
        manifest.write(directory, entries)


def raise_if_disk_full(err: BaseException, root: str, iteration: int) -> None:
    """Raise the one-line disk-full error when ``err`` is a full disk, or the failure of a rank
    stuck in a collective with one that found the disk full; return otherwise. Every rank that
    gets here removes the partial ``iter_N.tmp``."""
    if is_disk_full(err):
        _announce_disk_full()
    elif not _peer_saw_disk_full():
        return
    raise _disk_full_error(root, iteration, iteration_dir(root, iteration) + ".tmp") from None


def _disk_full_error(root: str, iteration: int, tmp: str) -> CheckpointError:
    shutil.rmtree(tmp, ignore_errors=True)  # every rank: a node-local or a shared directory
    try:
        previous = latest_iteration(root) if os.path.isdir(root) else None
    except CheckpointError:
        previous = None
    kept = (f"the previous checkpoint {iteration_dir(root, previous)} is intact"
            if previous is not None else "there is no earlier checkpoint")
    return CheckpointError(f"disk full while saving iteration {iteration} to {root} (partial "
                           f"{os.path.basename(tmp)} removed); {kept}; free space and resume")


def save_checkpoint(root: str, model_chunks: Sequence[torch.nn.Module], cfg: ModelConfig,
                    iteration: int = 0, extra_sharded: Optional[dict] = None,
                    common: Optional[dict] = None,
                    before_commit: Optional[Callable[[str], None]] = None) -> str:
    """Save the model (and optional extra sharded/common state) as iteration ``iteration``.

    ``extra_sharded`` is merged into the sharded state dict (e.g. ``{"optimizer": ...}``);
    ``common`` holds small replicated objects (saved once by dist_checkpointing).
    ``before_commit(tmp_dir)`` runs on every rank after the data and the manifest are written,
    before the rename (fault-injection tests kill the process there).
    Collective: every rank calls it. Returns the iteration directory.
    """
    from megatron.core import dist_checkpointing

    final = iteration_dir(root, iteration)
    tmp = final + ".tmp"
    state = _model_sharded_state_dict(model_chunks)
    state.update(extra_sharded or {})
    state.update(common or {})
    state[manifest.COMMON_KEY] = manifest.MANIFEST_FILE  # a deleted manifest is then an error
    try:
        if _rank() == 0:
            os.makedirs(root, exist_ok=True)
            if os.path.exists(tmp):
                shutil.rmtree(tmp)
            os.makedirs(tmp)
        _barrier()
        dist_checkpointing.save(state, tmp)
        _barrier()
        _write_manifest(tmp)
        if before_commit is not None:
            before_commit(tmp)
        _barrier()
        if _rank() == 0:  # a full disk here (config, tracker) leaves the previous one tracked
            commit_iteration(root, iteration, tmp, cfg)
        _barrier()
    except BaseException as err:  # noqa: BLE001 - DCP's CheckpointException is a BaseException
        if isinstance(err, (KeyboardInterrupt, SystemExit)):
            raise
        raise_if_disk_full(err, root, iteration)
        raise
    return final


def store_tokenizer(root: str, tokenizer_path: Optional[str]) -> Optional[str]:
    """Copy the tokenizer files of ``tokenizer_path`` (a sentencepiece ``.model`` file with its
    sidecar files, or a tokenizer directory) into ``root/tokenizer`` unless the same files are
    already there. Atomic (temporary directory, then rename). Returns the stored directory."""
    if not tokenizer_path or not os.path.exists(tokenizer_path):
        return None
    dest = os.path.join(root, TOKENIZER_SUBDIR)
    if os.path.abspath(tokenizer_path).rstrip("/") in (os.path.abspath(dest),
                                                       os.path.join(os.path.abspath(dest),
                                                                    "tokenizer.model")):
        return dest
    files = tokenizer_files(tokenizer_path)
    if not files:
        return None
    if os.path.isdir(dest) and all(_same_file(src, os.path.join(dest, name))
                                   for name, src in files.items()) \
            and set(os.listdir(dest)) == set(files):
        return dest
    tmp = dest + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        for name, src in files.items():
            shutil.copyfile(src, os.path.join(tmp, name))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # e.g. a full disk: nothing half-copied stays
        raise
    old = dest + _OLD_SUFFIX
    if os.path.exists(dest):
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dest, old)
    os.replace(tmp, dest)
    shutil.rmtree(old, ignore_errors=True)
    return dest


def tokenizer_files(path: str) -> dict:
    """``{name in the checkpoint: source path}`` of a tokenizer given as a file or directory."""
    if os.path.isdir(path):
        return {name: os.path.join(path, name) for name in _TOKENIZER_FILES
                if os.path.isfile(os.path.join(path, name))}
    directory = os.path.dirname(os.path.abspath(path))
    files = {"tokenizer.model": path}
    for name in ("added_tokens.json", "tokenizer_config.json", "special_tokens_map.json"):
        if os.path.isfile(os.path.join(directory, name)):
            files[name] = os.path.join(directory, name)
    return files


def _same_file(a: str, b: str) -> bool:
    if not os.path.isfile(b) or os.path.getsize(a) != os.path.getsize(b):
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        return fa.read() == fb.read()


def verify_iteration(root: str, iteration: int, hint=manifest.resume_hint,
                     note: Optional[Callable[[str], None]] = None) -> bool:
    """Verify ``root``'s iteration against its manifest before it is read (collective when
    torch.distributed is initialised: the ranks share the checksums). False: an older checkpoint
    without a manifest (``note`` got one line). Raises ``CheckpointIntegrityError``."""
    directory = iteration_dir(root, iteration)
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return manifest.verify_for_reading(directory, hint, note=note)
    # Every rank checks, or none: one may have verified it already (a CheckpointReader).
    done = [None] * dist.get_world_size()
    dist.all_gather_object(done, manifest.is_verified(directory))
    if all(done):
        return True
    return manifest.verify_for_reading(directory, hint, share=checksum_across_ranks, note=note,
                                       use_cache=False)


def load_checkpoint(root: str, model_chunks: Sequence[torch.nn.Module],
                    iteration: Optional[int] = None, extra_sharded: Optional[dict] = None,
                    strict: bool = True, verify: bool = True) -> tuple[int, dict]:
    """Load the model weights (and extra sharded state) saved by :func:`save_checkpoint`.

    Returns ``(iteration, loaded_state)``; ``loaded_state`` holds the extra and common entries.
    ``verify``: check the manifest first (collective; False when the caller has already).
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    if iteration is None:
        iteration = latest_iteration(root)
        if iteration is None:
            raise FileNotFoundError(f"no complete checkpoint in {root} (missing {TRACKER_FILE})")
    path = iteration_dir(root, iteration)
    if not os.path.isdir(path):
        found = complete_iterations(root)
        raise FileNotFoundError(
            f"checkpoint directory {path} does not exist"
            + (f" (complete iterations found by scanning: {found})" if found else ""))
    if verify:
        verify_iteration(root, iteration, manifest.path_hint)
    state = _model_sharded_state_dict(model_chunks)
    state.update(extra_sharded or {})
    loaded = dist_checkpointing.load(
        state, path,
        strict=StrictHandling.ASSUME_OK_UNEXPECTED if strict else StrictHandling.LOG_ALL,
    )
    loaded.pop(manifest.COMMON_KEY, None)
    if len(model_chunks) == 1:
        model_chunks[0].load_state_dict(loaded.pop("model"), strict=strict)
    else:
        for i, m in enumerate(model_chunks):
            m.load_state_dict(loaded.pop(f"model{i}"), strict=strict)
    return iteration, loaded
