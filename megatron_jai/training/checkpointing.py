"""Full training-state checkpoints on top of :mod:`megatron_jai.checkpoint.dist`.

One iteration directory holds everything needed to continue bit-exactly:

* the model (global-shape sharded tensors: loadable with any TP/PP/DP);
* the optimizer (``MegatronOptimizer.sharded_state_dict``: Adam moments as sharded tensors too);
* every rank's RNG states (python, numpy, torch CPU, CUDA, Megatron's tensor-parallel tracker) as a
  ``ShardedObject`` indexed by (pp, tp, dp) rank; restored only when the layout is unchanged;
* ``train_state`` (common): global iteration, phase index, step and consumed samples within the
  phase, consumed tokens, skipped-step count, the LR scheduler, the layout and the run's flags.

Writes go to ``iter_N.tmp`` and are renamed when complete (``dist.save_checkpoint``), so a process
killed mid-save leaves the previous checkpoint as the latest.

What a save root keeps (docs/training.md, "Checkpoints"):

* ``--keep-last K``: the newest K iterations of the current line of descent, plus the tracked one,
  plus the iteration this run resumed from (never deleted by the run that resumed from it);
* a rollback (``--load R --save R --load-iteration M`` with newer iterations in R): once every
  check has passed, the newer iterations of the abandoned line are moved, untouched, to
  ``R/abandoned/after_iter_M_<UTC time>/`` and the tracker points at M;
* ``--overwrite-save``: the previous run's iterations are deleted only after this run's first
  checkpoint is complete, and never when ``--save`` is the ``--load``/``--init-from`` checkpoint.

Before a run reads or writes anything, rank 0 takes ``--save``'s lock (:func:`lock_run_dirs`, one
run per save directory) and every rank verifies the iteration it will start from against its
manifest (:func:`verify_inputs`).
"""
from __future__ import annotations

import os
import random
import shutil
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional, Sequence

import numpy
import torch
import torch.distributed as dist

from megatron_jai.checkpoint import dist as dist_ckpt
from megatron_jai.checkpoint import lock as dir_lock
from megatron_jai.checkpoint import manifest
from megatron_jai.training.faults import TrainingError

ABANDONED_SUBDIR = "abandoned"


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
    # One entry per finished phase: name, steps, consumed_samples and its final scheduler state
    # (a later run may extend the last one: --train-iters raised after the run ended).
    finished_phases: list = field(default_factory=list)

    def finish_phase(self, name: str, scheduler: Optional[dict]) -> None:
        self.finished_phases.append({"name": name, "steps": self.phase_step,
                                     "consumed_samples": self.phase_consumed_samples,
                                     "scheduler": scheduler})
        self.phase_index += 1
        self.phase_step = self.phase_consumed_samples = 0
        self.scheduler = None


def extend_finished_phase(state: TrainState, phases: list, global_batch: Callable) -> list:
    """Reopen the checkpoint's last finished phase when this run gives it more steps and the next
    phase has not started. Returns the lines to print."""
    if state.phase_step or not state.finished_phases:
        return []
    index = state.phase_index - 1
    last = state.finished_phases[-1]
    if not 0 <= index < len(phases) or phases[index].name != last["name"]:
        return []
    iters = phases[index].iterations(global_batch(phases[index]))
    if iters <= last["steps"]:
        return []
    state.finished_phases.pop()
    state.phase_index = index
    state.phase_step = last["steps"]
    state.phase_consumed_samples = last["consumed_samples"]
    state.scheduler = last["scheduler"]
    return [f"phase {last['name']}: extended from {last['steps']} to {iters} steps (this run's "
            f"budget; the checkpoint's run ended it at step {last['steps']})"]


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
         before_commit: Optional[Callable[[str], None]] = None, tokenizer: Optional[str] = None,
         protect: Optional[int] = None, stale: Sequence[int] = ()) -> str:
    """Save the full training state of ``state.iteration``. Collective (every rank).

    ``tokenizer``: stored in ``root/tokenizer`` (exports and evaluation read it); ``protect``:
    an iteration pruning never deletes (the resume point); ``stale``: iterations of an
    overwritten run, deleted once this checkpoint is complete."""
    extra = _optimizer_sharded(model, optimizer, is_loading=False)
    extra.update(_rng_sharded(_rng_state()))
    state.layout = layout()
    # The root's model_config.json is the newest; each iteration keeps its own (RoPE changes).
    common = {"train_state": asdict(state), "args": args_snapshot or {},
              "model_config": model.jai_config.to_dict()}
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    try:
        if rank0 and tokenizer:
            os.makedirs(root, exist_ok=True)
            dist_ckpt.store_tokenizer(root, tokenizer)
    except OSError as err:  # the other ranks learn it in save_checkpoint's first collective
        try:
            dist_ckpt.raise_if_disk_full(err, root, state.iteration)
        except dist_ckpt.CheckpointError as full:
            raise TrainingError(str(full)) from None
        raise
    try:
        path = dist_ckpt.save_checkpoint(root, [model], model.jai_config, state.iteration,
                                         extra_sharded=extra, common=common,
                                         before_commit=before_commit)
    except dist_ckpt.CheckpointError as err:
        raise TrainingError(str(err)) from None
    if rank0:
        for it in stale:
            if it != state.iteration:
                shutil.rmtree(dist_ckpt.iteration_dir(root, it), ignore_errors=True)
        prune(root, keep_last, protect)
    if dist.is_initialized():
        dist.barrier()
    return path


complete_iterations = dist_ckpt.complete_iterations


def prune(root: str, keep_last: int, protect: Optional[int] = None) -> None:
    """Keep the newest ``keep_last`` complete checkpoints, the tracked latest and ``protect``;
    repair an interrupted commit, then drop temporaries left behind by saves that were killed."""
    dist_ckpt.recover_interrupted_commit(root)
    latest = dist_ckpt.latest_iteration(root)
    for it in complete_iterations(root)[:-keep_last]:
        if it not in (latest, protect):
            shutil.rmtree(dist_ckpt.iteration_dir(root, it), ignore_errors=True)
    for name in os.listdir(root):
        if name.startswith("iter_") and name.endswith(".tmp"):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


@dataclass
class SavePlan:
    stale_iterations: list  # an overwritten run's: deleted after the first new checkpoint
    abandoned: list  # a rollback's newer iterations: moved aside


def _same_path(a: Optional[str], b: Optional[str]) -> bool:
    return bool(a) and bool(b) and os.path.realpath(a) == os.path.realpath(b)


def _inside(path: Optional[str], root: str) -> bool:
    if not path:
        return False
    path, root = os.path.realpath(path), os.path.realpath(root)
    return path == root or path.startswith(root + os.sep)


def plan_save_dir(save: Optional[str], load: Optional[str], resume_iteration: Optional[int],
                  init_from: Optional[str], overwrite: bool) -> SavePlan:
    """What the save root needs before this run writes to it; refuses (TrainingError) what
    would mix two runs or destroy a checkpoint this run starts from. Reads only."""
    if not save:
        return SavePlan([], [])
    existing = complete_iterations(save)
    if _same_path(save, load):
        return SavePlan([], [it for it in existing if it > resume_iteration])
    if not existing and not os.path.isfile(os.path.join(save, dist_ckpt.TRACKER_FILE)):
        return SavePlan([], [])
    if not overwrite:
        raise TrainingError(f"--save {save} already holds checkpoints of another run; resume "
                            f"with --load {save}, or pass --overwrite-save")
    for flag, path in (("--init-from", init_from), ("--load", load)):
        if _inside(path, save):
            raise TrainingError(f"--overwrite-save would delete the {flag} checkpoint {path} "
                                f"(it is --save {save}); save to another directory")
    return SavePlan(existing, [])


def set_aside_abandoned(root: str, resume_iteration: int, iterations: Sequence[int]) -> str:
    """Move the iterations newer than the resume point into ``root/abandoned/after_iter_M_<UTC>``
    (nothing is deleted) and point the tracker at the resume point. Rank 0 only."""
    import time

    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    dest = os.path.join(root, ABANDONED_SUBDIR, f"after_iter_{resume_iteration:07d}_{stamp}")
    os.makedirs(dest, exist_ok=True)
    for it in iterations:
        src = dist_ckpt.iteration_dir(root, it)
        os.replace(src, os.path.join(dest, os.path.basename(src)))
    dist_ckpt.write_tracker(root, resume_iteration)
    return dest


def checkpoint_tokenizer(root: Optional[str]) -> Optional[str]:
    """The tokenizer stored in a checkpoint root, if any."""
    if not root:
        return None
    path = os.path.join(root, dist_ckpt.TOKENIZER_SUBDIR)
    return path if os.path.isdir(path) else None


def saved_model_config(root: str, iteration: Optional[int] = None):
    """The ModelConfig of a saved iteration (default the latest)."""
    from megatron.core import dist_checkpointing

    from megatron_jai.config import ModelConfig
    from megatron_jai.presets import load_model_config

    iteration = dist_ckpt.latest_iteration(root) if iteration is None else iteration
    path = dist_ckpt.iteration_dir(root, iteration)
    if not os.path.isdir(path):
        raise TrainingError(f"no checkpoint of iteration {iteration} in {root} (have "
                            f"{complete_iterations(root) or 'none'})")
    saved = dist_checkpointing.load_common_state_dict(path).get("model_config")
    return ModelConfig.from_dict(saved) if saved else load_model_config(root)


def has_checkpoint(root: Optional[str]) -> bool:
    """Whether ``--load root`` resumes. A root with iterations but no tracker (deleted) is a
    TrainingError naming the newest iteration that verifies, as an empty tracker is."""
    try:
        if bool(root) and dist_ckpt.latest_iteration(root) is not None:
            return True
    except dist_ckpt.CheckpointError as err:
        raise TrainingError(str(err)) from None
    if root and complete_iterations(root):
        tracker = os.path.join(root, dist_ckpt.TRACKER_FILE)
        raise TrainingError(f"{tracker} is missing but {root} holds iterations "
                            f"{complete_iterations(root)}; {dist_ckpt.suggest_iteration(root)}")
    return False


def _start_iteration(root: Optional[str], iteration: Optional[int]) -> Optional[int]:
    """The iteration a run would read from ``root`` (None: nothing there, or a tracker problem
    that resolving the run reports)."""
    if not root or not os.path.isdir(root):
        return None
    if iteration is None:
        try:
            iteration = dist_ckpt.latest_iteration(root)
        except dist_ckpt.CheckpointError:
            return None
    if iteration is None or not os.path.isdir(dist_ckpt.iteration_dir(root, iteration)):
        return None
    return iteration


def verify_inputs(load: Optional[str], load_iteration: Optional[int], init_from: Optional[str],
                  note: Callable[[str], None]) -> None:
    """Verify the checkpoint iteration this run starts from (``--load``'s, else
    ``--init-from``'s) against its manifest before anything of it is read. Collective: the ranks
    share the checksums. Raises TrainingError (one line: the file, what is wrong, the newest
    iteration that verifies)."""
    target = None
    it = _start_iteration(load, load_iteration)
    if it is not None:
        target = (load, it, manifest.resume_hint)
    else:
        it = _start_iteration(init_from, None)
        if it is not None:
            target = (init_from, it, manifest.tracker_hint)
    if target is None:
        return
    try:
        dist_ckpt.verify_iteration(*target, note=note)
    except manifest.CheckpointIntegrityError as err:
        raise TrainingError(str(err)) from None


def lock_run_dirs(save: Optional[str], load: Optional[str], init_from: Optional[str],
                  force_unlock: bool) -> tuple:
    """Rank 0, before anything is read or written: take ``--save``'s lock (one run per save
    directory). ``--load`` / ``--init-from`` of a directory another live run holds is allowed
    (only complete, verified iterations are read: the run writes into ``iter_N.tmp`` and renames)
    but that directory is then left as it is (no repair of an interrupted commit there).
    Returns ``(lock or None, notes, read_only_dirs)``; raises SaveDirLockError."""
    held, notes, read_only = None, [], set()
    if save:
        held, notes = dir_lock.acquire(save, force=force_unlock)
    for flag, path in (("--load", load), ("--init-from", init_from)):
        if not path or (save and os.path.realpath(path) == os.path.realpath(save)):
            continue
        info = dir_lock.live_holder(path)
        if info is not None:
            read_only.add(path)
            notes.append(f"note: {flag} {path} belongs to a run in progress "
                         f"({dir_lock.describe(info)}); reading its newest complete iteration, "
                         f"which is verified first")
    return held, notes, read_only


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
    try:  # a no-op when the run verified it already (verify_inputs)
        dist_ckpt.verify_iteration(root, iteration)
    except manifest.CheckpointIntegrityError as err:
        raise TrainingError(str(err)) from None
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
    _, loaded = dist_ckpt.load_checkpoint(root, [model], iteration=iteration, extra_sharded=extra,
                                          verify=False)
    if load_optimizer:
        optimizer.load_state_dict(loaded["optimizer"])
    if same_layout:
        _set_rng_state(loaded["rng_state"])
    return state, same_layout


def load_model_weights(root: str, model) -> int:
    """Only the model weights of the latest checkpoint under ``root`` (``--init-from``)."""
    try:
        iteration, _ = dist_ckpt.load_checkpoint(root, [model])
    except (FileNotFoundError, manifest.CheckpointIntegrityError) as err:
        raise TrainingError(str(err)) from None
    return iteration
