"""Merging checkpoints of one architecture: linear, slerp, task arithmetic, TIES
(``tools/merge_checkpoints.py``; JAI-1 merges two SFT models 1:1 before DPO).

Works on our checkpoints directly, whatever TP/PP/EP saved them (tensors are stored in their global
shape), and streams: one layer of one tensor from each input at a time, computed in fp32 (fp64
inputs in fp64), cast to the inputs' dtype (or ``dtype``), written at once. Every model tensor is
merged, experts and router included; optimizer states and RNG are not read, so the output is a
model-only iteration-0 checkpoint that ``pretrain_jai.py --init-from`` loads and
``convert_checkpoint.py mcore-to-hf`` exports.

Methods (per tensor, as mergekit's methods of the same names; ``x_i`` the inputs, ``w_i`` their
weights, default 1; ``b`` the base)::

    linear           sum_i w_i x_i / sum_i w_i   (normalize, the default; 1:1 = the elementwise mean)
    slerp            spherical interpolation from x_0 (t=0) to x_1 (t=1), linear when the two
                     tensors are nearly colinear (|cos| > 0.9995)
    task_arithmetic  b + lambda * sum_i w_i (x_i - b)          (divided by sum_i w_i with normalize)
    ties             b + lambda * disjoint mean of the trimmed task vectors: keep each w_i (x_i - b)'s
                     ``density`` fraction of largest magnitudes, elect each entry's sign from the
                     sum, average the entries that agree with it (divided by their weights' sum)

What slerp and ties see as "one tensor" is what Hugging Face stores as one: one layer of a stacked
``decoder.layers.*`` tensor, and one expert of an expert tensor (``weight_gate_up`` keeps gate and
up rows together, like Phi-3's ``gate_up_proj``).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
import weakref
from typing import Callable, Optional, Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from tqdm import tqdm

from megatron_jai.checkpoint.convert import peak_rss_bytes
from megatron_jai.checkpoint.dist import TOKENIZER_SUBDIR, tokenizer_files
from megatron_jai.checkpoint.stream import (HF_SUBDIR, CheckpointReader, CheckpointWriter,
                                            copy_side_files, model_keys)
from megatron_jai.cli import UserError
from megatron_jai.config import ModelConfig

METHODS = ("linear", "slerp", "task_arithmetic", "ties")
NEEDS_BASE = ("task_arithmetic", "ties")
DEFAULT_NORMALIZE = {"linear": True, "task_arithmetic": False, "ties": True}  # mergekit's
COLINEAR_COS = 0.9995  # slerp falls back to linear interpolation above this |cos|
# Training settings, not architecture: inputs may differ in them (the first input's are kept).
TRAINING_FIELDS = ("name", "init_method_std", "moe_aux_loss_coeff", "moe_z_loss_coeff",
                   "moe_expert_bias_update_rate", "moe_capacity_factor", "moe_token_drop_policy")
EXPERT_TENSORS = ".mlp.experts."  # per-layer tensors with a leading expert dimension
MERGE_RECORD = "merge.json"  # in the output root: the method, the inputs and their iterations


class MergeError(UserError):
    """Inputs or options that cannot be merged (one line, exit 2)."""


# ---- the methods, on one tensor of each input (any float dtype; computed in fp32 or wider) -------
def _wide(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def linear(xs: Sequence[torch.Tensor], weights: Sequence[float], normalize: bool = True) -> torch.Tensor:
    out = torch.zeros(xs[0].shape, dtype=torch.promote_types(xs[0].dtype, torch.float32))
    for x, w in zip(xs, weights):
        out.add_(x, alpha=w)  # casts x element by element: no fp32 copy of it
    # sum, then divide: 1:1 is bit for bit torch.stack([a, b]).mean(0)
    return out.div_(sum(weights)) if normalize else out


def slerp(a: torch.Tensor, b: torch.Tensor, t: float, eps: float = 1e-8) -> torch.Tensor:
    a, b = _wide(a), _wide(b)
    na, nb = a.norm().item(), b.norm().item()
    cos = torch.dot(a.flatten(), b.flatten()).item() / ((na if na > eps else 1.0) *
                                                         (nb if nb > eps else 1.0))
    if abs(cos) > COLINEAR_COS:
        s0, s1 = 1.0 - t, t
    else:
        theta = math.acos(cos)
        s0, s1 = math.sin(theta - theta * t) / math.sin(theta), math.sin(theta * t) / math.sin(theta)
    return (a * s0).add_(b, alpha=s1)  # t=0: s0 = 1, s1 = 0 exactly (and t=1 the other way)


def task_arithmetic(base: torch.Tensor, xs: Sequence[torch.Tensor], weights: Sequence[float],
                    lam: float = 1.0, normalize: bool = False) -> torch.Tensor:
    base = _wide(base)
    mixed = torch.zeros_like(base)
    for x, w in zip(xs, weights):
        mixed.add_(x - base, alpha=w)
    if normalize:
        total = sum(weights)
        mixed.div_(total if abs(total) >= 1e-8 else 1.0)
    return mixed.mul_(lam).add_(base)


def trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Zero all but the ``int(density * n)`` (at least one) largest magnitudes, in place."""
    if density >= 1:
        return delta
    magnitude = delta.abs()
    keep = max(1, int(density * delta.numel()))
    threshold = magnitude.flatten().kthvalue(delta.numel() - keep + 1).values
    return delta.masked_fill_(magnitude < threshold, 0)


def ties(base: torch.Tensor, xs: Sequence[torch.Tensor], weights: Sequence[float],
         density: float = 1.0, lam: float = 1.0, normalize: bool = True) -> torch.Tensor:
    base = _wide(base)
    deltas = [trim(x - base, density).mul_(w) for x, w in zip(xs, weights)]
    total = deltas[0].clone()
    for d in deltas[1:]:
        total.add_(d)
    positive = total >= 0  # the elected sign of each entry
    del total
    mixed, divisor = torch.zeros_like(base), torch.zeros_like(base)
    for d, w in zip(deltas, weights):
        agree = torch.where(positive, d > 0, d < 0)
        mixed.add_(d.mul_(agree))
        divisor.add_(agree, alpha=w)
    if normalize:
        mixed.div_(divisor.masked_fill_(divisor == 0, 1))
    return mixed.mul_(lam).add_(base)


# ---- memory accounting --------------------------------------------------------------------------
class HeldBytes(TorchDispatchMode):
    """While active: the bytes of all tensor storages alive that torch ops created (reads, fp32
    copies, temporaries, outputs), and their peak. A storage counts until its last tensor dies."""

    def __init__(self):
        super().__init__()
        self._live: dict[int, list] = {}  # storage pointer -> [bytes, tensors alive]
        self.held = self.peak = 0

    def _release(self, ptr: int) -> None:
        entry = self._live[ptr]
        entry[1] -= 1
        if entry[1] == 0:
            self.held -= entry[0]
            del self._live[ptr]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr == 0:
                continue
            entry = self._live.get(ptr)
            if entry is None:
                entry = self._live[ptr] = [storage.nbytes(), 0]
                self.held += entry[0]
                self.peak = max(self.peak, self.held)
            entry[1] += 1
            weakref.finalize(t, self._release, ptr)
        return out


# ---- checks -------------------------------------------------------------------------------------
def architecture(cfg: ModelConfig) -> dict:
    d = cfg.to_dict()
    for field in TRAINING_FIELDS:
        d.pop(field, None)
    return d


def tokenizer_fingerprint(root: str) -> dict:
    """``{file: sha256}`` of the tokenizer an export of the checkpoint carries: the HF tokenizer
    files kept in ``hf/``, replaced by those of ``tokenizer/`` (training, vocabulary surgery)."""
    files = {}
    for sub in (HF_SUBDIR, TOKENIZER_SUBDIR):
        if os.path.isdir(os.path.join(root, sub)):
            files.update(tokenizer_files(os.path.join(root, sub)))
    out = {}
    for name, path in sorted(files.items()):
        with open(path, "rb") as f:
            out[name] = hashlib.sha256(f.read()).hexdigest()
    return out


def _check_options(method: str, n: int, weights, has_base: bool, t, density, lam,
                   normalize: Optional[bool]) -> None:
    if method not in METHODS:
        raise MergeError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    if method == "slerp":
        if n != 2:
            raise MergeError(f"slerp interpolates between exactly two inputs, got {n}")
        for flag, given in (("--weights", weights), ("--base", has_base), ("--density", density),
                            ("--lambda", lam), ("--normalize", normalize)):
            if given not in (None, False):
                raise MergeError(f"slerp takes --t, not {flag}")
        if t is not None and not 0 <= t <= 1:
            raise MergeError(f"--t must be in [0, 1], got {t}")
        return
    if t is not None:
        raise MergeError(f"--t is for slerp, not {method}")
    if method in NEEDS_BASE and not has_base:
        raise MergeError(f"{method} needs --base (the model the inputs were fine-tuned from)")
    if method == "linear":
        if has_base:
            raise MergeError("linear takes no --base (task_arithmetic and ties do)")
        if lam is not None:
            raise MergeError("--lambda is for task_arithmetic and ties")
    if n < (2 if method == "linear" else 1):
        raise MergeError(f"{method} needs at least {2 if method == 'linear' else 1} inputs, got {n}")
    if density is not None and method != "ties":
        raise MergeError(f"--density is for ties, not {method}")
    if density is not None and not 0 < density <= 1:
        raise MergeError(f"--density must be in (0, 1], got {density}")
    if weights is not None:
        if len(weights) != n:
            raise MergeError(f"{len(weights)} weights for {n} inputs")
        if not all(math.isfinite(w) for w in weights):
            raise MergeError(f"weights must be finite numbers, got {list(weights)}")
        if method == "linear" and normalize is not False and sum(weights) == 0:
            raise MergeError("the weights sum to 0: cannot normalize (use --no-normalize)")


def _check_output(readers: Sequence[CheckpointReader], out: str, force: bool) -> None:
    out = os.path.realpath(out)
    if os.path.exists(out) and not force:
        raise MergeError(f"output {out} already exists (use --force to replace it)")
    for r in readers:
        src = os.path.realpath(r.root)
        if src == out or src.startswith(out + os.sep) or out.startswith(src + os.sep):
            raise MergeError(f"--out {out} must not be an input's checkpoint root, contain one or "
                             f"lie inside one ({r.root})")


def _check_compatible(readers: Sequence[CheckpointReader], names: Sequence[str]) -> None:
    """Same architecture, tokenizer, tensors and shapes as the first input, or one line why not."""
    first, first_name = readers[0], names[0]
    arch = architecture(first.config)
    stacked, others = model_keys(first)
    if not stacked and not others:
        raise MergeError(f"{first_name} holds no model tensors")
    shapes = {k: first.shape(k) for k in stacked + others}
    tokenizer = tokenizer_fingerprint(first.root)
    for r, name in zip(readers[1:], names[1:]):
        other = architecture(r.config)
        diff = [f"{k} {arch[k]} vs {other.get(k)}" for k in arch if arch[k] != other.get(k)]
        if diff:
            raise MergeError(f"{name} has a different architecture than {first_name}: "
                             f"{'; '.join(diff[:3])}")
        tok = tokenizer_fingerprint(r.root)  # compared where both have a file (one may lack some)
        differ = sorted(k for k in set(tok) & set(tokenizer) if tok[k] != tokenizer[k])
        if differ:
            raise MergeError(f"{name} has a different tokenizer than {first_name} "
                             f"({', '.join(differ[:3])} differ)")
        keys = model_keys(r)
        if keys != (stacked, others):
            missing = sorted(set(shapes) ^ set(keys[0] + keys[1]))
            raise MergeError(f"{name} holds different tensors than {first_name} "
                             f"(e.g. {missing[0] if missing else 'their order'})")
        for k, shape in shapes.items():
            if r.shape(k) != shape:
                raise MergeError(f"{name}: {k} has shape {tuple(r.shape(k))}, {first_name} "
                                 f"{tuple(shape)}")


# ---- streaming ----------------------------------------------------------------------------------
def _combiner(method: str, weights, t, density, lam, normalize) -> Callable:
    """``f(inputs, base) -> merged`` on the tensors of one merge unit."""
    if method == "slerp":
        return lambda xs, base: slerp(xs[0], xs[1], t)
    if method == "linear":
        return lambda xs, base: linear(xs, weights, normalize)
    if method == "task_arithmetic":
        return lambda xs, base: task_arithmetic(base, xs, weights, lam, normalize)
    return lambda xs, base: ties(base, xs, weights, density, lam, normalize)


def _merge_tensor(key: str, tensors: list, has_base: bool, combine: Callable,
                  dtype: Optional[torch.dtype], expert_dim: bool) -> torch.Tensor:
    """One layer (or one whole non-layer tensor) of every input, then the base, merged."""
    first = tensors[0]
    if not first.is_floating_point():
        if any(not torch.equal(x, first) for x in tensors[1:]):
            raise MergeError(f"{key} is not a floating-point tensor and differs between the "
                             f"inputs: it cannot be merged")
        return first
    out = torch.empty(first.shape, dtype=dtype or first.dtype)
    for unit in (range(first.shape[0]) if expert_dim else (slice(None),)):
        xs = [x[unit] for x in tensors]
        base = xs.pop() if has_base else None
        out[unit] = combine(xs, base)
        del xs, base
    return out


def merge_checkpoints(method: str, inputs: Sequence[str], out: str, *,
                      weights: Optional[Sequence[float]] = None, base: Optional[str] = None,
                      t: Optional[float] = None, density: Optional[float] = None,
                      lam: Optional[float] = None, normalize: Optional[bool] = None,
                      dtype: Optional[torch.dtype] = None, name: Optional[str] = None,
                      force: bool = False, progress: bool = True) -> dict:
    """Write the merge of ``inputs`` (checkpoint roots, or ``ROOT/iter_N`` directories) to ``out``.

    ``None`` options take their defaults (weights 1, t 0.5, density 1, lambda 1, normalize per
    method); options a method does not take are refused. Returns a summary dict."""
    start = time.time()
    inputs = list(inputs)
    _check_options(method, len(inputs), weights, base is not None, t, density, lam, normalize)
    readers = [CheckpointReader(p) for p in inputs + ([base] if base else [])]
    _check_output(readers, out, force)
    names = [*(f"input {i + 1} ({p})" for i, p in enumerate(inputs)), *([f"base ({base})"] * bool(base))]
    _check_compatible(readers, names)
    weights = [float(w) for w in weights] if weights is not None else [1.0] * len(inputs)
    t = 0.5 if t is None else float(t)
    density = 1.0 if density is None else float(density)
    lam = 1.0 if lam is None else float(lam)
    normalize = DEFAULT_NORMALIZE.get(method, False) if normalize is None else normalize
    combine = _combiner(method, weights, t, density, lam, normalize)

    first = readers[0]
    cfg = first.config if name is None else first.config.replace(name=name)
    stacked, others = model_keys(first)
    num_layers = max((first.shape(k)[0] for k in stacked), default=0)
    largest = max([first.num_bytes(k) for k in others] +
                  [first.num_bytes(k) // first.shape(k)[0] for k in stacked])
    record = {"method": method, "inputs": [_describe(r) for r in readers[:len(inputs)]],
              **({"base": _describe(readers[-1])} if base else {}),
              **({"t": t} if method == "slerp" else {"weights": weights, "normalize": normalize}),
              **({"lambda": lam} if method in NEEDS_BASE else {}),
              **({"density": density} if method == "ties" else {})}
    meter = HeldBytes()
    with CheckpointWriter(out, cfg, force=force) as writer:
        with open(writer.path(MERGE_RECORD), "w") as f:
            json.dump(record, f, indent=2)
            f.write("\n")
        for r in readers:  # the tokenizer and HF files travel along (the architecture is the same)
            copy_side_files(r.root, writer, same_model=True)
        steps = len(others) + sum(first.shape(k)[0] for k in stacked)
        with meter, tqdm(total=steps, desc=f"merge {method}", unit="tensor",
                         disable=not progress, dynamic_ncols=True) as bar:
            for key in others:
                writer.write(key, _merge_tensor(key, [r.read(key) for r in readers], bool(base),
                                                combine, dtype, expert_dim=False))
                bar.update(1)
            for layer in range(num_layers):  # layer-major: each input's chunks are read in order
                for key in (k for k in stacked if layer < first.shape(k)[0]):
                    merged = _merge_tensor(key, [r.read_layer(key, layer) for r in readers],
                                           bool(base), combine, dtype,
                                           expert_dim=EXPERT_TENSORS in key)
                    writer.write_layer(key, layer, first.shape(key)[0], merged)
                    del merged
                    bar.update(1)
        bytes_written = writer.bytes_written
    return {"out": os.path.abspath(out), "method": method, "inputs": len(inputs),
            "base": base is not None, "tensors": len(stacked) + len(others), "layers": num_layers,
            "bytes": bytes_written, "seconds": time.time() - start, "held_peak_bytes": meter.peak,
            "largest_tensor_bytes": largest, "peak_rss_bytes": peak_rss_bytes(), "config": cfg,
            "record": record}


def _describe(r: CheckpointReader) -> dict:
    return {"path": r.root, "iteration": r.iteration}


def summary_line(s: dict) -> str:
    mib = 2 ** 20
    return (f"merge {s['method']}: {s['inputs']} inputs{' + base' if s['base'] else ''}, "
            f"{s['tensors']} tensors ({s['layers']} layers), wrote {s['out']} "
            f"({s['bytes'] / mib:.1f} MiB) in {s['seconds']:.1f}s; held at most "
            f"{s['held_peak_bytes'] / mib:.1f} MiB at once (largest tensor "
            f"{s['largest_tensor_bytes'] / mib:.1f} MiB), peak RSS {s['peak_rss_bytes'] / mib:.0f} MiB")
