"""Megatron-Core distributed checkpoints (``dist_checkpointing``, torch_dist format).

Layout of a checkpoint root ``M/`` (Megatron-LM's, plus the architecture)::

    M/model_config.json                  the ModelConfig
    M/latest_checkpointed_iteration.txt  the newest complete iteration
    M/iter_0000100/                      one dist_checkpointing directory per saved iteration

An iteration directory is written under a temporary name and renamed when every rank has
finished, so a crash mid-save never leaves a directory that looks complete.
Sharded tensors are stored in their global shape, so any TP/PP/EP can load them.
"""
from __future__ import annotations

import os
import shutil
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist

from megatron_jai.config import ModelConfig

TRACKER_FILE = "latest_checkpointed_iteration.txt"
CONFIG_FILE = "model_config.json"
TOKENIZER_SUBDIR = "tokenizer"  # the tokenizer a vocabulary surgery gave the model, if any
MERGE_RECORD = "merge.json"  # how a merged checkpoint was made (tools/merge_checkpoints.py)


def iteration_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def latest_iteration(root: str) -> Optional[int]:
    path = os.path.join(root, TRACKER_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return int(f.read().strip())


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _model_sharded_state_dict(model_chunks: Sequence[torch.nn.Module]) -> dict:
    if len(model_chunks) == 1:
        return {"model": model_chunks[0].sharded_state_dict()}
    return {f"model{i}": m.sharded_state_dict() for i, m in enumerate(model_chunks)}


def save_checkpoint(root: str, model_chunks: Sequence[torch.nn.Module], cfg: ModelConfig,
                    iteration: int = 0, extra_sharded: Optional[dict] = None,
                    common: Optional[dict] = None,
                    before_commit: Optional[Callable[[str], None]] = None) -> str:
    """Save the model (and optional extra sharded/common state) as iteration ``iteration``.

    ``extra_sharded`` is merged into the sharded state dict (e.g. ``{"optimizer": ...}``);
    ``common`` holds small replicated objects (saved once by dist_checkpointing).
    ``before_commit(tmp_dir)`` runs on every rank after the data is written, before the rename
    (fault-injection tests kill the process there).
    Collective: every rank calls it. Returns the iteration directory.
    """
    from megatron.core import dist_checkpointing

    final = iteration_dir(root, iteration)
    tmp = final + ".tmp"
    if _rank() == 0:
        os.makedirs(root, exist_ok=True)
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
        os.makedirs(tmp)
    _barrier()
    state = _model_sharded_state_dict(model_chunks)
    state.update(extra_sharded or {})
    state.update(common or {})
    dist_checkpointing.save(state, tmp)
    if before_commit is not None:
        before_commit(tmp)
    _barrier()
    if _rank() == 0:
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        # The root's config describes the tracked iteration: written with it, not before the data
        # (a save killed half-way must not leave a newer config, e.g. another RoPE, behind).
        cfg.save(os.path.join(root, CONFIG_FILE))
        tracker_tmp = os.path.join(root, TRACKER_FILE + ".tmp")
        with open(tracker_tmp, "w") as f:
            f.write(f"{iteration}\n")
        os.replace(tracker_tmp, os.path.join(root, TRACKER_FILE))
    _barrier()
    return final


def load_checkpoint(root: str, model_chunks: Sequence[torch.nn.Module],
                    iteration: Optional[int] = None, extra_sharded: Optional[dict] = None,
                    strict: bool = True) -> tuple[int, dict]:
    """Load the model weights (and extra sharded state) saved by :func:`save_checkpoint`.

    Returns ``(iteration, loaded_state)``; ``loaded_state`` holds the extra and common entries.
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    if iteration is None:
        iteration = latest_iteration(root)
        if iteration is None:
            raise FileNotFoundError(f"no complete checkpoint in {root} (missing {TRACKER_FILE})")
    path = iteration_dir(root, iteration)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint directory {path} does not exist")
    state = _model_sharded_state_dict(model_chunks)
    state.update(extra_sharded or {})
    loaded = dist_checkpointing.load(
        state, path,
        strict=StrictHandling.ASSUME_OK_UNEXPECTED if strict else StrictHandling.LOG_ALL,
    )
    if len(model_chunks) == 1:
        model_chunks[0].load_state_dict(loaded.pop("model"), strict=strict)
    else:
        for i, m in enumerate(model_chunks):
            m.load_state_dict(loaded.pop(f"model{i}"), strict=strict)
    return iteration, loaded
