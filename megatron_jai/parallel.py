"""Process groups: torch.distributed + Megatron-Core model parallel state, on GPU (NCCL) or CPU
(gloo, with the compatibility layer of ``megatron_jai.compat.cpu``)."""
from __future__ import annotations

import os
from datetime import timedelta

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
