"""Let Megatron-Core run on CPU with the gloo backend (tests, the tiny demo).

Megatron-Core assumes CUDA in a handful of places. On a machine without CUDA those calls raise, so
replacing them changes nothing that could otherwise work. ``install()`` is a no-op when CUDA is
available. What it patches, and why:

* ``torch.cuda.current_device()`` is used as a ``device=`` argument all over Megatron-Core
  (rotary embeddings, tensor-parallel layers, p2p communication, DDP buffers): answer ``"cpu"``.
* ``torch.cuda`` streams / synchronize / empty_cache (MoE all-to-all dispatcher, DDP): no-ops.
* The CUDA RNG tracker (``tensor_parallel.random``) forks CUDA generator states: fork the CPU
  generator instead, so dropout and init stay reproducible per tensor-parallel rank.
* ``device="cuda"`` literals in pipeline schedules, DDP buffers and MoE logging: those modules see a
  ``torch`` whose tensor factories map "cuda" to "cpu".
* The MoE router references ``te_general_gemm`` even when Transformer Engine is absent: define it
  as ``None`` there so the plain matmul path is taken.
"""
from __future__ import annotations

import contextlib
import importlib
import types

import torch

_INSTALLED = False

# Megatron-Core modules that create tensors with a literal device="cuda".
_MODULES_WITH_CUDA_LITERALS = (
    "megatron.core.utils",
    "megatron.core.rerun_state_machine",
    "megatron.core.tensor_parallel.data",
    "megatron.core.transformer.utils",
    "megatron.core.transformer.moe.moe_utils",
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.dist_checkpointing.exchange_utils",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
)
_TENSOR_FACTORIES = ("zeros", "ones", "empty", "empty_like", "full", "tensor", "arange", "randn", "rand")


def is_active() -> bool:
    """True when the compatibility layer is (or would be) in effect: no CUDA on this machine."""
    return not torch.cuda.is_available()


class _DummyStream:
    """Stands in for ``torch.cuda.Stream`` on CPU, where every op is already synchronous."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, other):
        pass

    def synchronize(self):
        pass

    def record_event(self, event=None):
        return None

    def __eq__(self, other):
        return isinstance(other, _DummyStream)

    __hash__ = object.__hash__


_CPU_STREAM = _DummyStream()


def _cpu_device(device):
    if device is None:
        return None
    if isinstance(device, torch.device):
        return torch.device("cpu") if device.type == "cuda" else device
    if isinstance(device, int) or (isinstance(device, str) and device.startswith("cuda")):
        return torch.device("cpu")
    return device


class _TorchWithCpuFactories(types.ModuleType):
    """``torch`` as seen by modules with ``device="cuda"`` literals: factories land on CPU."""

    def __init__(self):
        super().__init__("torch")

    def __getattr__(self, name):
        attr = getattr(torch, name)
        if name in _TENSOR_FACTORIES:

            def factory(*args, device=None, _fn=attr, **kwargs):
                return _fn(*args, device=_cpu_device(device), **kwargs)

            return factory
        return attr


def install() -> bool:
    """Patch Megatron-Core for CPU. Returns True if the patches are (now) in effect."""
    global _INSTALLED
    if not is_active():
        return False
    if _INSTALLED:
        return True

    cuda = torch.cuda
    cuda.current_device = lambda: "cpu"
    cuda.synchronize = lambda *a, **k: None
    cuda.empty_cache = lambda: None
    cuda.Stream = _DummyStream
    cuda.current_stream = lambda *a, **k: _CPU_STREAM
    cuda.default_stream = lambda *a, **k: _CPU_STREAM
    cuda.stream = lambda *a, **k: contextlib.nullcontext()
    cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
    cuda.random.get_rng_state = cuda.get_rng_state
    cuda.manual_seed = torch.manual_seed

    from megatron.core.tensor_parallel import random as tp_random

    tp_random._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    tp_random._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)

    cpu_torch = _TorchWithCpuFactories()
    for name in _MODULES_WITH_CUDA_LITERALS:
        importlib.import_module(name).torch = cpu_torch

    moe_utils = importlib.import_module("megatron.core.transformer.moe.moe_utils")
    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None

    _INSTALLED = True
    return True
