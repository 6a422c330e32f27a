"""Full training-state checkpoints on top of :mod:`megatron_jai.checkpoint.dist`.

One iteration directory holds everything needed to continue bit-exactly:

* the model (global-shape sharded tensors: loadable with any TP/PP/DP);
* the optimizer (``MegatronOptimizer.sharded_state_dict``: Adam moments as sharded tensors too);
* every rank's RNG states (python, numpy, torch CPU, CUDA, Megatron's tensor-parallel tracker) as a
  ``ShardedObject`` indexed by (pp, tp, dp) rank; restored only when the layout is unchanged;
* ``train_state`` (common): global iteration, phase index, step and consumed samples within the
  phase, consumed tokens, skipped-step count, the LR scheduler, the layout and the run's flags.

Writes go to ``iter_N.tmp`` and are renamed when complete (``dist.save_checkpoint``), so a process
killed mid-save leaves the previous checkpoint as the latest; the newest ``keep_last`` are kept.
"""
from __future__ import annotations

import os
import random
import re
import shutil
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import numpy
import torch
import torch.distributed as dist

from megatron_jai.checkpoint import dist as dist_ckpt
from megatron_jai.training.faults import TrainingError

_ITER_DIR = re.compile(r"^iter_(\d{7})$")


@dataclass
class TrainState:
    """Where a run stands; saved in every checkpoint."""

    iteration: int = 0  # global steps done (skipped steps included)
    phase_index: int = 0
    phase_step: int = 0  # steps done within the phase
    phase_consumed_samples: int = 0  # samples of the phase's dataset consumed
    consumed_tokens: int = 0
    skipped_steps: int = 0
    scheduler: Optional[dict] = None
    layout: dict = field(default_factory=dict)  # tp/pp/dp/ep of the run that saved it
    phase_name: str = ""


def layout() -> dict:
    from megatron.core import parallel_state as ps

    return {"tp": ps.get_tensor_model_parallel_world_size(),
            "pp": ps.get_pipeline_model_parallel_world_size(),
            "dp": ps.get_data_parallel_world_size(),
            "ep": ps.get_expert_model_parallel_world_size()}


def _rng_state() -> dict:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    state = {"python": random.getstate(), "numpy": numpy.random.get_state(),
             "torch": torch.get_rng_state(), "tracker": get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    random.setstate(state["python"])
    numpy.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])
    get_cuda_rng_tracker().set_states(state["tracker"])


def _rng_sharded(data) -> dict:
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    shape = (ps.get_pipeline_model_parallel_world_size(), ps.get_tensor_model_parallel_world_size(),
             ps.get_data_parallel_world_size())
    offset = (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank(),
              ps.get_data_parallel_rank())
    return {"rng_state": ShardedObject("rng_state", data, shape, offset, replica_id=0)}


def _optimizer_sharded(model, optimizer, is_loading: bool) -> dict:
    return {"optimizer": optimizer.sharded_state_dict(model.sharded_state_dict(),
                                                      is_loading=is_loading)}


def save(root: str, model, optimizer, state: TrainState, keep_last: int,
         args_snapshot: Optional[dict] = None,
         before_commit: Optional[Callable[[str], None]] = None) -> str:
    """Save the full training state of ``state.iteration``. Collective (every rank)."""
    extra = _optimizer_sharded(model, optimizer, is_loading=False)
    extra.update(_rng_sharded(_rng_state()))
    state.layout = layout()
    # The root's model_config.json is the newest; each iteration keeps its own (RoPE changes).
    common = {"train_state": asdict(state), "args": args_snapshot or {},
              "model_config": model.jai_config.to_dict()}
    path = dist_ckpt.save_checkpoint(root, [model], model.jai_config, state.iteration,
                                     extra_sharded=extra, common=common,
                                     before_commit=before_commit)
    if not dist.is_initialized() or dist.get_rank() == 0:
        prune(root, keep_last)
    if dist.is_initialized():
        dist.barrier()
    return path


def complete_iterations(root: str) -> list[int]:
    if not os.path.isdir(root):
        return []
    return sorted(int(m.group(1)) for m in map(_ITER_DIR.match, os.listdir(root)) if m)


def prune(root: str, keep_last: int) -> None:
    """Keep the newest ``keep_last`` complete checkpoints (never the tracked latest); drop
    temporaries left behind by saves that were killed."""
    latest = dist_ckpt.latest_iteration(root)
    for it in complete_iterations(root)[:-keep_last]:
        if it != latest:
            shutil.rmtree(dist_ckpt.iteration_dir(root, it), ignore_errors=True)
    for name in os.listdir(root):
        if name.startswith("iter_") and name.endswith(".tmp"):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def saved_model_config(root: str, iteration: Optional[int] = None):
    """The ModelConfig of a saved iteration (default the latest)."""
    from megatron.core import dist_checkpointing

    from megatron_jai.config import ModelConfig, load_model_config

    iteration = dist_ckpt.latest_iteration(root) if iteration is None else iteration
    path = dist_ckpt.iteration_dir(root, iteration)
    if not os.path.isdir(path):
        raise TrainingError(f"no checkpoint of iteration {iteration} in {root} (have "
                            f"{complete_iterations(root) or 'none'})")
    saved = dist_checkpointing.load_common_state_dict(path).get("model_config")
    return ModelConfig.from_dict(saved) if saved else load_model_config(root)


def has_checkpoint(root: Optional[str]) -> bool:
    return bool(root) and dist_ckpt.latest_iteration(root) is not None


def load(root: str, model, optimizer, load_optimizer: bool = True,
         iteration: Optional[int] = None) -> tuple[TrainState, bool]:
    """Load the latest (or the given) complete checkpoint under ``root`` into ``model`` (and
    ``optimizer``).

    Returns ``(train_state, rng_restored)``. RNG states are restored only when the saved layout
    equals the current one (they are per rank); otherwise the caller's seeding stands.
    """
    from megatron.core import dist_checkpointing

    if iteration is None:
        iteration = dist_ckpt.latest_iteration(root)
    if iteration is None:
        raise TrainingError(f"no complete checkpoint in {root}")
    path = dist_ckpt.iteration_dir(root, iteration)
    if not os.path.isdir(path):
        raise TrainingError(f"no checkpoint of iteration {iteration} in {root} (have "
                            f"{complete_iterations(root) or 'none'})")
    try:
        common = dist_checkpointing.load_common_state_dict(path)
    except Exception as err:  # noqa: BLE001 - any failure here means an unusable checkpoint
        raise TrainingError(f"cannot read checkpoint {path}: {err}") from None
    saved = common.get("train_state")
    if saved is None:
        raise TrainingError(f"{path} holds no training state (a model-only checkpoint? "
                            f"use --init-from)")
    state = TrainState(**saved)
    same_layout = state.layout == layout()
    extra = _optimizer_sharded(model, optimizer, is_loading=True) if load_optimizer else {}
    if same_layout:
        extra.update(_rng_sharded(None))
    _, loaded = dist_ckpt.load_checkpoint(root, [model], iteration=iteration, extra_sharded=extra)
    if load_optimizer:
        optimizer.load_state_dict(loaded["optimizer"])
    if same_layout:
        _set_rng_state(loaded["rng_state"])
    return state, same_layout


def load_model_weights(root: str, model) -> int:
    """Only the model weights of the latest checkpoint under ``root`` (``--init-from``)."""
    try:
        iteration, _ = dist_ckpt.load_checkpoint(root, [model])
    except FileNotFoundError as err:
        raise TrainingError(str(err)) from None
    return iteration
