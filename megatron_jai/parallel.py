"""Process groups: torch.distributed + Megatron-Core model parallel state, on GPU (NCCL) or CPU
(gloo, with the compatibility layer of ``megatron_jai.compat.cpu``); and the arithmetic of
pipeline splits (which layers each stage holds, which DUS skips cross a stage boundary)."""
from __future__ import annotations

import os
from datetime import timedelta
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from megatron_jai.compat import cpu as cpu_compat


def initialize(tp: int = 1, pp: int = 1, ep: int = 1, seed: int = 1234,
               timeout_minutes: int = 30) -> None:
    """Initialise torch.distributed (from torchrun's env, or a single process) and Megatron-Core's
    parallel state. World size must be a multiple of tp * pp (the rest is data parallel)."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    cpu_compat.install()
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        kwargs = {}
        if "RANK" not in os.environ:
            # A single process outside torchrun: a private rendezvous, without writing MASTER_*
            # into os.environ (child processes would inherit a port that is still in use).
            kwargs = dict(init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo",
                                timeout=timedelta(minutes=timeout_minutes), **kwargs)
    world = dist.get_world_size()
    if world % (tp * pp):
        raise ValueError(f"world size {world} is not a multiple of TP*PP = {tp}*{pp}")
    if ep > 1 and (world // pp) % ep:
        raise ValueError(f"expert parallel size {ep} must divide world/PP = {world // pp}")
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        expert_model_parallel_size=ep,
    )
    model_parallel_cuda_manual_seed(seed)


def destroy() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- pipeline splits -------------------------------------------------------------------------
def pipeline_stage_layers(num_layers: int, pp: int, first: Optional[int] = None,
                          last: Optional[int] = None) -> list:
    """Decoder layers of each of the ``pp`` pipeline stages, Megatron's split: ``first`` / ``last``
    layers on the first / last stage when given, the rest shared evenly by the other stages.
    Raises ``ValueError`` (one clear line) for a split Megatron cannot build."""
    if pp < 1:
        raise ValueError(f"pipeline parallel size must be >= 1, got {pp}")
    for what, n in (("first", first), ("last", last)):
        if n is not None and not 0 < n < num_layers:
            raise ValueError(f"layers in the {what} pipeline stage must be between 1 and "
                             f"{num_layers - 1} (the model has {num_layers}), got {n}")
    uneven = first is not None or last is not None
    if uneven and pp == 1:
        raise ValueError("first/last pipeline stage layer counts need pipeline parallel size >= 2")
    if not uneven:
        if num_layers % pp:
            raise ValueError(f"pipeline parallel size {pp} must divide num_layers {num_layers} "
                             f"(or give the first/last stage layer counts for an uneven split)")
        return [num_layers // pp] * pp
    middle_stages = pp - (first is not None) - (last is not None)
    middle_layers = num_layers - (first or 0) - (last or 0)
    split = f"{num_layers} layers over PP={pp} with {first or '-'}/{last or '-'} layers on the " \
            f"first/last stage"
    if middle_stages == 0:
        if middle_layers:
            raise ValueError(f"pipeline split of {split}: first + last must equal {num_layers} "
                             f"when PP={pp}")
    elif middle_layers < middle_stages or middle_layers % middle_stages:
        raise ValueError(f"pipeline split of {split}: the {max(middle_layers, 0)} remaining layers "
                         f"must divide evenly over the {middle_stages} other stage(s)")
    sizes = [middle_layers // middle_stages] * middle_stages if middle_stages else []
    return ([first] if first is not None else []) + sizes + ([last] if last is not None else [])


def stage_boundaries(num_layers: int, pp: int, first: Optional[int] = None,
                     last: Optional[int] = None) -> list:
    """First global layer of every stage after the first, for Megatron's (un)even PP split
    (``num_layers_in_first_pipeline_stage`` / ``..._last_...``); None if the split is invalid."""
    try:
        sizes = pipeline_stage_layers(num_layers, pp, first, last)
    except ValueError:
        return None
    bounds, acc = [], 0
    for s in sizes[:-1]:
        acc += s
        bounds.append(acc)
    return bounds


def crossing_skips(skips: Sequence, boundaries: Sequence[int]) -> list:
    """Skips whose saved state must travel between stages (a boundary b with source < b <= target)."""
    return [s for s in skips if any(s.source < b <= s.target for b in boundaries)]


def stage_local_layouts(num_layers: int, skips: Sequence, pp: int) -> list:
    """PP splits of ``pp`` stages that keep every skip inside one stage (no saved state has to
    travel between stages): ``(num_layers_in_first_pipeline_stage, ..._last_...)`` pairs
    (None = Megatron's default even share), the most balanced first."""
    found = []
    candidates = [(None, None)] + [(f, l) for f in range(1, num_layers) for l in range(1, num_layers)]
    for first, last in candidates:
        bounds = stage_boundaries(num_layers, pp, first, last)
        if bounds is not None and not crossing_skips(skips, bounds):
            sizes = [b - a for a, b in zip([0] + bounds, bounds + [num_layers])]
            found.append((max(sizes), first is not None, (first, last)))
    # Best balanced first (the slowest stage sets the pace), the even split before uneven ones.
    return [layout for *_, layout in sorted(found, key=lambda f: (f[0], f[1]))]


def pipeline_flags(pp: int, first: Optional[int] = None, last: Optional[int] = None) -> str:
    """The ``pretrain_jai.py`` flags of a (possibly uneven) pipeline split."""
    flags = f"--pp {pp}"
    if first is not None:
        flags += f" --first-stage-layers {first}"
    if last is not None:
        flags += f" --last-stage-layers {last}"
    return flags
