"""Routing metadata: the compiled op (C++ on CPU, CUDA on GPU; ``routing.cpp``, ``routing_cuda.cu``),
its Python entry point and its plain-torch reference. An integer permutation: no autograd Function.

Conventions shared by every implementation here and the Triton expert kernels (``moe_grouped_gemm``):

* A token ``n`` with ``k`` routing choices owns the *slots* ``s = n * k + j`` (``j < k``), i.e. the
  flattened ``expert_ids`` ``[N, k]``.
* ``expert_ids`` holds *local* expert indices. Any id outside ``[0, num_experts)`` -- by convention
  ``-1`` -- marks a slot that is skipped: a token dropped by the capacity factor, or routed to an
  expert that lives on another expert-parallel rank. Skipped slots contribute nothing.
* Routing metadata is the stable sort of the slots by expert id, with skipped slots sorted after all
  experts (as if their id were ``num_experts``):

  - ``tokens_per_expert`` ``[E]``: slots routed to each expert;
  - ``offsets`` ``[E + 1]``: ``offsets[e]:offsets[e + 1]`` are expert ``e``'s positions in the sorted
    order; ``offsets[E]`` is the number of routed (non-skipped) slots;
  - ``sorted_slots`` ``[N * k]``: the slot at each sorted position (a full permutation; positions
    ``>= offsets[E]`` hold the skipped slots in ascending order);
  - ``slot_positions`` ``[N * k]``: its inverse, the sorted position of each slot.

  All four are ``int64`` on the device of ``expert_ids``. Within an expert, slots keep their original
  order (stable), which is what makes every implementation produce bit-identical metadata.

:func:`routing_metadata` picks the op by device; if the compiled extension is missing (or was built
without CUDA and the ids are on a GPU), it warns once and falls back to
:func:`routing_metadata_reference`.
"""
from __future__ import annotations

import importlib
import warnings
from typing import NamedTuple

import torch

EXTENSION = f"{__package__}._routing"  # built by build_ext.py
_EXTENSION = None
_IMPORT_ERROR = None
_WARNED = set()


class RoutingMetadata(NamedTuple):
    tokens_per_expert: torch.Tensor  # [E] int64
    sorted_slots: torch.Tensor  # [N*k] int64, the permutation (sorted position -> slot)
    slot_positions: torch.Tensor  # [N*k] int64, its inverse (slot -> sorted position)
    offsets: torch.Tensor  # [E+1] int64, group boundaries in sorted order


def valid_slot_mask(expert_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """True where a slot is routed to a local expert (ids in ``[0, num_experts)``)."""
    return (expert_ids >= 0) & (expert_ids < num_experts)


def load_extension():
    """The compiled ``_routing`` module of this package, or None if it was not built."""
    global _EXTENSION, _IMPORT_ERROR
    if _EXTENSION is None and _IMPORT_ERROR is None:
        try:
            _EXTENSION = importlib.import_module(EXTENSION)
        except ImportError as exc:  # not built: fall back to the reference (with a warning)
            _IMPORT_ERROR = exc
    return _EXTENSION


def _warn_once(key, message):
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def routing_metadata(expert_ids: torch.Tensor, num_experts: int) -> RoutingMetadata:
    """Routing metadata of ``expert_ids`` ``[N, k]`` by the compiled op of its device (no host
    synchronisation on CUDA)."""
    if expert_ids.dtype.is_floating_point or expert_ids.dtype in (torch.bool, torch.complex64, torch.complex128):
        raise ValueError(f"expert_ids must be an integer tensor, got {expert_ids.dtype}")
    if num_experts < 1:
        raise ValueError(f"num_experts must be >= 1, got {num_experts}")
    if expert_ids.dtype not in (torch.int32, torch.int64):
        expert_ids = expert_ids.long()
    ext = load_extension()
    if ext is None:
        _warn_once("missing", f"{EXTENSION} is not built ({_IMPORT_ERROR}); using the "
                              "torch reference (run `pip install --no-build-isolation -e .` to build it)")
        return routing_metadata_reference(expert_ids, num_experts)
    if expert_ids.device.type == "cuda":
        if not ext.has_cuda:
            _warn_once("nocuda", f"{EXTENSION} was built without CUDA; using the torch "
                                 "reference for CUDA tensors (rebuild on a machine with CUDA torch + nvcc)")
            return routing_metadata_reference(expert_ids, num_experts)
        return RoutingMetadata(*ext.routing_metadata_cuda(expert_ids, int(num_experts)))
    if expert_ids.device.type == "cpu":
        return RoutingMetadata(*ext.routing_metadata_cpu(expert_ids, int(num_experts)))
    return routing_metadata_reference(expert_ids, num_experts)


# ---- plain-torch reference -----------------------------------------------------------------------

def routing_metadata_reference(expert_ids: torch.Tensor, num_experts: int) -> RoutingMetadata:
    """Stable sort of the ``N * k`` slots by expert (see the module docstring for the convention)."""
    if num_experts < 1:
        raise ValueError(f"num_experts must be >= 1, got {num_experts}")
    flat = expert_ids.reshape(-1).long()
    keys = torch.where(valid_slot_mask(flat, num_experts), flat, torch.full_like(flat, num_experts))
    sorted_slots = torch.sort(keys, stable=True).indices
    slot_positions = torch.empty_like(sorted_slots)
    slot_positions[sorted_slots] = torch.arange(flat.numel(), device=flat.device)
    tokens_per_expert = torch.bincount(keys, minlength=num_experts + 1)[:num_experts]
    offsets = torch.zeros(num_experts + 1, dtype=torch.long, device=flat.device)
    offsets[1:] = torch.cumsum(tokens_per_expert, 0)
    return RoutingMetadata(tokens_per_expert, sorted_slots, slot_positions, offsets)
