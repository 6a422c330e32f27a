"""What differs between two saved iterations (``iter_N`` directories of torch_dist checkpoints),
read without a model or a process group: every sharded tensor and object (RNG states included,
through torch.distributed.checkpoint) and the common state (``common.pt``).

Exact resume is checked with it: a killed-and-resumed run's final checkpoint must equal an
uninterrupted run's, bit for bit, but for the run's own command line (``common/args``).
"""
from __future__ import annotations

import io
import math
import os
from typing import Iterable

import numpy
import torch

COMMON_FILE = "common.pt"


def read_sharded(path: str) -> dict:
    """Every sharded entry of one iteration directory, by its key (``rng_state/shard_...``)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.format_utils import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    state: dict = {}
    _load_state_dict(state, storage_reader=FileSystemReader(os.path.abspath(path)),
                     planner=_EmptyStateDictLoadPlanner(), no_dist=True)
    return state


def read_common(path: str) -> dict:
    return torch.load(os.path.join(path, COMMON_FILE), map_location="cpu", weights_only=False)


def diff_values(a, b, where: str = "") -> list:
    """``["path: what differs", ...]`` between two nested values (dicts, lists, tuples, tensors,
    numpy arrays, plain values); tensors must match in shape, dtype and every bit (NaNs equal)."""
    if isinstance(a, io.BytesIO) and isinstance(b, io.BytesIO):
        a, b = a.getvalue(), b.getvalue()
    if torch.is_tensor(a) or torch.is_tensor(b):
        if not (torch.is_tensor(a) and torch.is_tensor(b)):
            return [f"{where}: a tensor on one side only"]
        if a.shape != b.shape or a.dtype != b.dtype:
            return [f"{where}: {a.dtype}{list(a.shape)} vs {b.dtype}{list(b.shape)}"]
        if not torch.equal(_bits(a), _bits(b)):  # bit for bit: NaNs equal, -0.0 != 0.0
            changed = int((_bits(a) != _bits(b)).sum())
            return [f"{where}: tensor values differ ({changed} of {a.numel() * a.element_size()} "
                    f"bytes)"]
        return []
    if isinstance(a, numpy.ndarray) or isinstance(b, numpy.ndarray):
        if not (isinstance(a, numpy.ndarray) and isinstance(b, numpy.ndarray)
                and a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()):
            return [f"{where}: arrays differ"]
        return []
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b), key=str):
            if key not in a or key not in b:
                out.append(f"{where}/{key}: only in {'the first' if key in a else 'the second'}")
            else:
                out += diff_values(a[key], b[key], f"{where}/{key}")
        return out
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{where}: {len(a)} vs {len(b)} items"]
        out = [d for i, (x, y) in enumerate(zip(a, b)) for d in diff_values(x, y, f"{where}[{i}]")]
        if len(out) > 3:  # e.g. a Mersenne Twister state: one line, not 624
            return [f"{where}: {len(out)} of {len(a)} items differ, first {out[0]}"]
        return out
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return []
    if type(a) is not type(b) or a != b:
        return [f"{where}: {_short(a)} vs {_short(b)}"]
    return []


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def diff_iterations(first: str, second: str, ignore: Iterable[str] = ()) -> list:
    """Differences between two iteration directories: ``sharded/<key>...`` (tensors, optimizer
    state, RNG states) and ``common/<key>...``. Paths starting with an entry of ``ignore`` (e.g.
    ``common/args/load``) are left out."""
    out = diff_values(read_sharded(first), read_sharded(second), "sharded")
    out += diff_values(read_common(first), read_common(second), "common")
    ignore = tuple(ignore)
    return [d for d in out if not d.split(":", 1)[0].startswith(ignore)] if ignore else out
