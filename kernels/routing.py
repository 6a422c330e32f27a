"""Python entry point of the routing-metadata op (C++ on CPU, CUDA on GPU; see routing.cpp).

``routing_metadata(expert_ids [N, k], num_experts)`` -> :class:`megatron_jai.moe.reference.RoutingMetadata`
(tokens_per_expert [E], sorted_slots [N*k], slot_positions [N*k], offsets [E+1], all int64, on the
device of ``expert_ids``). If the compiled extension is missing (or was built without CUDA and the
ids are on a GPU), it warns once and falls back to the torch reference.
"""
from __future__ import annotations

import importlib
import warnings

import torch

from megatron_jai.moe.reference import RoutingMetadata, routing_metadata_reference

_EXTENSION = None
_IMPORT_ERROR = None
_WARNED = set()


def load_extension():
    """The compiled ``megatron_jai.kernels._routing`` module, or None if it was not built."""
    global _EXTENSION, _IMPORT_ERROR
    if _EXTENSION is None and _IMPORT_ERROR is None:
        try:
            _EXTENSION = importlib.import_module("megatron_jai.kernels._routing")
        except ImportError as exc:  # not built: fall back to the reference (with a warning)
            _IMPORT_ERROR = exc
    return _EXTENSION


def _warn_once(key, message):
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def routing_metadata(expert_ids: torch.Tensor, num_experts: int) -> RoutingMetadata:
    if expert_ids.dtype.is_floating_point or expert_ids.dtype in (torch.bool, torch.complex64, torch.complex128):
        raise ValueError(f"expert_ids must be an integer tensor, got {expert_ids.dtype}")
    if num_experts < 1:
        raise ValueError(f"num_experts must be >= 1, got {num_experts}")
    if expert_ids.dtype not in (torch.int32, torch.int64):
        expert_ids = expert_ids.long()
    ext = load_extension()
    if ext is None:
        _warn_once("missing", f"megatron_jai.kernels._routing is not built ({_IMPORT_ERROR}); using the "
                              "torch reference (run `pip install --no-build-isolation -e .` to build it)")
        return routing_metadata_reference(expert_ids, num_experts)
    if expert_ids.device.type == "cuda":
        if not ext.has_cuda:
            _warn_once("nocuda", "megatron_jai.kernels._routing was built without CUDA; using the torch "
                                 "reference for CUDA tensors (rebuild on a machine with CUDA torch + nvcc)")
            return routing_metadata_reference(expert_ids, num_experts)
        return RoutingMetadata(*ext.routing_metadata_cuda(expert_ids, int(num_experts)))
    if expert_ids.device.type == "cpu":
        return RoutingMetadata(*ext.routing_metadata_cpu(expert_ids, int(num_experts)))
    return routing_metadata_reference(expert_ids, num_experts)
