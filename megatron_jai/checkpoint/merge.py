"""Merging checkpoints of one architecture as mergekit merges their Hugging Face exports
(``tools/merge_checkpoints.py``; JAI-1 merges two SFT models 1:1 before DPO).

Works on our checkpoints directly, whatever TP/PP/EP saved them (tensors are stored in their global
shape), and streams: one layer of one tensor from each input at a time, computed in fp32 (fp64
inputs in fp64), cast to the inputs' dtype (or ``dtype``), written at once; worker threads read
and merge the next tensors while one is written, within the bytes of the largest tensor. Every
model tensor is merged, experts and router included; optimizer states and RNG are not read, so
the output is a model-only iteration-0 checkpoint that ``pretrain_jai.py --init-from`` loads and
``convert_checkpoint.py mcore-to-hf`` exports.

The methods, their parameters and defaults are mergekit's (0.1.5), per tensor (``x_i`` the inputs,
``w_i`` their weights, ``b`` the base; ``d_i = x_i - b`` the task vectors)::

    linear            sum_i w_i x_i / sum_i w_i            (normalize, the default)
    slerp             spherical interpolation from x_0 (t=0) to x_1 (t=1); linear when |cos| > 0.9995
    task_arithmetic   b + lambda * sum_i w_i d_i           (/ sum_i w_i with normalize)
    ties              d_i keeps its top ``density`` magnitudes; each entry's sign is elected from
                      sum_i w_i d_i; b + lambda * sum of the agreeing w_i d_i / their weights' sum
    dare_linear       d_i keeps each entry with probability ``density`` (seeded), rescaled to its
                      L1 norm; then as task_arithmetic
    dare_ties         the same sparsification, then ties' sign election
    breadcrumbs(_ties) d_i drops its ``gamma`` largest and its smallest magnitudes, keeping a
                      ``density`` share; then as task_arithmetic (ties)
    model_stock       b + t (mean_i x_i - b), t = N c / (1 + (N - 1) c), c the mean pairwise cosine
                      of the d_i (per row with ``filter_wise``)

"One tensor" is one tensor of the Hugging Face model the export loads as (mergekit merges those):
``formats.tensor_map``'s split of a layer (q, k and v apart and gate and up apart in the JAI layout,
Phi-3's fused ``qkv_proj`` and ``gate_up_proj``, each expert's w1/w3/w2 in the JAI layout; a Mixtral
layer's experts as transformers >= 5 holds them, ``mlp.experts.gate_up_proj`` and ``down_proj``).
Vocabulary padding rows (embedding and output rows >= ``vocab_size``) take no part in any
statistic: the output keeps the first input's padding rows. Parameters may differ per tensor as in
mergekit: ``[{filter: self_attn, value: 0.3}, {value: 0.7}]`` picks by substring of the HF tensor
name, a list of numbers is a gradient interpolated over the layers.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from megatron_jai.checkpoint import formats
from megatron_jai.checkpoint.convert import DTYPES, peak_rss_bytes
from megatron_jai.checkpoint.dist import TOKENIZER_SUBDIR, tokenizer_files
from megatron_jai.checkpoint.stream import HF_SUBDIR, CheckpointReader, Surgery, model_keys
from megatron_jai.cli import UserError, read_yaml
from megatron_jai.config import ModelConfig

MAX_WORKERS = 8  # merge threads by default (more rarely help: memory bandwidth)
COLINEAR_COS = 0.9995  # slerp falls back to linear interpolation above this |cos|
# Training settings, not architecture: inputs may differ in them (the first input's are kept).
TRAINING_FIELDS = ("name", "init_method_std", "moe_aux_loss_coeff", "moe_z_loss_coeff",
                   "moe_expert_bias_update_rate", "moe_capacity_factor", "moe_token_drop_policy")
VOCAB_TABLES = ("embedding.word_embeddings.weight", "output_layer.weight")  # rows: token ids
MERGE_RECORD = "merge.json"  # in the output root: the method, the inputs and their iterations
# transformers >= 5 loads a Mixtral export's experts fused per layer, exactly our stacked layer
# ([E, 2F, H] with rows [w1; w3] per expert, and [E, H, F]), and mergekit merges those tensors.
MIXTRAL_MODEL_TENSORS = {
    "decoder.layers.mlp.experts.weight_gate_up": "model.layers.{layer}.mlp.experts.gate_up_proj",
    "decoder.layers.mlp.experts.weight_down": "model.layers.{layer}.mlp.experts.down_proj",
    "decoder.layers.mlp.router.weight": "model.layers.{layer}.mlp.gate.weight",
}


class MergeError(UserError):
    """Inputs or options that cannot be merged (one line, exit 2)."""


# ---- the methods: mergekit's registry, for the methods we have ---------------------------------
@dataclass(frozen=True)
class Method:
    name: str
    shared: dict  # parameters of the whole merge -> default
    per_model: dict  # parameters of each input (not the base) -> default
    base: bool = False  # merges task vectors x_i - base
    inputs: tuple = (1, None)  # fewest and most inputs besides the base
    sparsify: Optional[str] = None  # "magnitude", "random" (DARE), "magnitude_outliers"
    consensus: bool = False  # TIES sign election


def _task_vectors(name, sparsify=None, consensus=False, normalize=False, rescale=False) -> Method:
    per_model = {"weight": 1.0, "density": 1.0}
    if sparsify == "magnitude_outliers":
        per_model["gamma"] = 0.01
    return Method(name, {"normalize": normalize, "rescale": rescale, "lambda": 1.0,
                         "int8_mask": False}, per_model, True, (1, None), sparsify, consensus)


METHODS = {m.name: m for m in (
    Method("linear", {"normalize": True}, {"weight": 1.0}, inputs=(2, None)),
    Method("slerp", {"t": 0.5}, {}, inputs=(2, 2)),
    _task_vectors("task_arithmetic"),
    _task_vectors("ties", "magnitude", consensus=True, normalize=True),
    _task_vectors("dare_linear", "random", rescale=True),
    _task_vectors("dare_ties", "random", consensus=True, rescale=True),
    _task_vectors("breadcrumbs", "magnitude_outliers"),
    _task_vectors("breadcrumbs_ties", "magnitude_outliers", consensus=True),
    Method("model_stock", {"filter_wise": False}, {}, base=True, inputs=(2, None)),
)}
FLAGS = {"normalize", "rescale", "int8_mask", "filter_wise"}  # boolean parameters
SHARES = {"t", "density", "gamma"}  # parameters in [0, 1]


# ---- the methods, on one tensor of each input (any float dtype; computed in fp32 or wider) -------
def _wide(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _work_dtype(*xs: torch.Tensor) -> torch.dtype:
    """The dtype the methods compute in: fp32, or wider where an input is."""
    dtype = torch.float32
    for x in xs:
        dtype = torch.promote_types(dtype, x.dtype)
    return dtype


def _difference(x: torch.Tensor, base: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x - base`` in ``dtype``: one new tensor, and no wide copy of ``base`` (the in-place
    subtraction widens each element as it goes; the values are those of wide(x) - wide(base))."""
    return x.to(dtype, copy=True).sub_(base)


def _map(fn, items: Sequence, workers: int) -> list:
    """``[fn(item) for item in items]``, in up to ``workers`` threads (torch releases the GIL)."""
    if workers <= 1 or len(items) <= 1:
        return [fn(item) for item in items]
    with ThreadPoolExecutor(min(workers, len(items))) as pool:
        return list(pool.map(fn, items))


def linear(xs: Sequence[torch.Tensor], weights: Sequence[float], normalize: bool = True) -> torch.Tensor:
    # the first term is w_0 x_0 as 0 + w_0 x_0 gives it; the others add in place, each cast element
    # by element: no fp32 copy of them
    out = xs[0].to(_work_dtype(*xs), copy=True)
    if weights[0] != 1:
        out.mul_(weights[0])
    for x, w in zip(xs[1:], weights[1:]):
        out.add_(x, alpha=w)
    # sum, then divide: 1:1 is bit for bit torch.stack([a, b]).mean(0)
    return out.div_(sum(weights)) if normalize else out


def slerp(a: torch.Tensor, b: torch.Tensor, t: float, eps: float = 1e-8) -> torch.Tensor:
    a, b = a.to(_work_dtype(a, b), copy=True), _wide(b)  # a becomes the result
    na, nb = a.norm().item(), b.norm().item()
    cos = torch.dot(a.flatten(), b.flatten()).item() / ((na if na > eps else 1.0) *
                                                         (nb if nb > eps else 1.0))
    if abs(cos) > COLINEAR_COS:
        s0, s1 = 1.0 - t, t
    else:
        theta = math.acos(max(-1.0, min(1.0, cos)))
        s0, s1 = math.sin(theta - theta * t) / math.sin(theta), math.sin(theta * t) / math.sin(theta)
    return a.mul_(s0).add_(b, alpha=s1)  # t=0: s0 = 1, s1 = 0 exactly (and t=1 the other way)


def _ranked(magnitude: torch.Tensor, lo: int, hi: int, descending: bool,
            ties_likely: bool = False) -> torch.Tensor:
    """The entries at positions ``[lo, hi)`` of ``magnitude`` (flat) sorted as mergekit sorts it
    (``torch.argsort`` / ``torch.sort``, ties in torch's order): found with ``kthvalue``, and only
    when equal values straddle a boundary (at once when ``ties_likely``) with the sort itself.
    ``magnitude`` is overwritten (sorted in place: no second copy of it)."""
    n = magnitude.numel()
    first, last = (n - hi, n - lo) if descending else (lo, hi)  # the window in ascending order
    if last <= first:
        return torch.zeros(n, dtype=torch.bool)
    exact = not ties_likely  # no equal values straddle a boundary (or they are 0: values agree)
    keep = None
    if first > 0 and exact:
        low = magnitude.kthvalue(first + 1).values
        keep = magnitude >= low
        exact &= bool(low == 0) or int((magnitude < low).sum()) == first
    if last < n and exact:
        high = magnitude.kthvalue(last).values
        below = magnitude <= high
        keep = below if keep is None else keep.logical_and_(below)
        exact &= bool(high == 0) or int(below.sum()) == last
    if not exact:
        # the sort mergekit runs (argsort is this sort's indices), sorting the values in place;
        # an unstable sort orders equal values by the whole tensor, so nothing cheaper gives its
        # choice among the values tied at a boundary
        order = torch.empty(n, dtype=torch.long)
        torch.sort(magnitude, descending=descending, out=(magnitude, order))
        keep = torch.zeros(n, dtype=torch.bool)
        keep[order[lo:hi]] = True
    return keep if keep is not None else torch.ones(n, dtype=torch.bool)


def _kept(magnitude: torch.Tensor, method: str, density: float, gamma: float = 0.0,
          ties_likely: bool = False) -> torch.Tensor:
    """The entries of a task vector that ``magnitude`` / ``magnitude_outliers`` keep, from its
    magnitudes (flat; overwritten), as a flat bool mask; ``0 < density < 1``."""
    n = magnitude.numel()
    if method == "magnitude":
        return _ranked(magnitude, 0, max(1, int(density * n)), True, ties_likely)
    kept = int(density * n)
    low = max(0, n - kept - int(gamma * n))
    return _ranked(magnitude, low, low + kept, False, ties_likely)


def _masked(delta: torch.Tensor, keep: torch.Tensor, rescale: bool, exact: bool = True) -> torch.Tensor:
    """``delta * keep`` in place, with ``rescale`` its L1 norm restored as mergekit restores it
    (``exact``: its arithmetic; else the same norms without copies of |delta|)."""
    keep = keep.view(delta.shape)
    if not rescale:
        return delta.mul_(keep)
    l1 = (lambda t: t.abs().sum()) if exact else (lambda t: torch.linalg.vector_norm(t, 1))
    before = l1(delta)
    delta.mul_(keep)
    after = l1(delta)
    if before >= 1e-7 and after >= 1e-7:  # mergekit's eps
        delta.mul_(before / after)
    return delta


def sparsify(delta: torch.Tensor, method: str, density: float, rescale: bool = False,
             gamma: float = 0.0, generator: Optional[torch.Generator] = None,
             ties_likely: bool = False) -> torch.Tensor:
    """mergekit's sparsification of one task vector (in place): ``magnitude`` keeps the
    ``max(1, int(density * n))`` largest magnitudes, ``magnitude_outliers`` drops the
    ``int(gamma * n)`` largest and keeps the next ``int(density * n)``, ``random`` (DARE) keeps
    each entry with probability ``density``; ``rescale`` restores the L1 norm. ``ties_likely``
    (16-bit inputs: few distinct values) sorts at once rather than first trying ``kthvalue``."""
    if density >= 1:
        return delta
    if method == "random":  # DARE: no value-by-value parity with mergekit to keep
        return _masked(delta, torch.rand(delta.shape, generator=generator) < density, rescale,
                       exact=False)
    if density <= 0 or delta.numel() == 0:
        return _masked(delta, torch.zeros(delta.shape, dtype=torch.bool), rescale)
    keep = _kept(delta.abs().reshape(-1), method, density, gamma, ties_likely)
    return _masked(delta, keep, rescale)


def task_vectors(base: torch.Tensor, xs: Sequence[torch.Tensor], weights: Sequence[float], *,
                 densities: Optional[Sequence[float]] = None, sparsify_method: Optional[str] = None,
                 consensus: bool = False, normalize: bool = False, rescale: bool = False,
                 lam: float = 1.0, gammas: Optional[Sequence[float]] = None,
                 generators: Optional[Sequence[torch.Generator]] = None,
                 workers: int = 1) -> torch.Tensor:
    """mergekit's generalized task arithmetic (task_arithmetic, ties, dare_*, breadcrumbs*).
    ``workers`` threads make the inputs' task vectors (their sorts, their random masks) at once."""
    ties_likely = base.element_size() < 4
    dtype = _work_dtype(base, *xs)

    def task_vector(i: int) -> torch.Tensor:
        if sparsify_method in ("magnitude", "magnitude_outliers") and 0 < densities[i] < 1 \
                and base.numel() > 0:
            # the magnitudes are sorted in place, and the task vector made again after: during
            # the sort only the magnitudes, the order and the mask are held (not the vector too)
            keep = _kept(_difference(xs[i], base, dtype).abs_().reshape(-1), sparsify_method,
                         densities[i], gammas[i] if gammas else 0.0, ties_likely)
            d = _masked(_difference(xs[i], base, dtype), keep, rescale)
            del keep
        else:
            d = _difference(xs[i], base, dtype)
            if sparsify_method:
                d = sparsify(d, sparsify_method, densities[i], rescale,
                             gammas[i] if gammas else 0.0, generators[i] if generators else None,
                             ties_likely)
        return d.mul_(weights[i]) if weights[i] != 1 else d  # x * 1 is x: one pass saved

    deltas = _map(task_vector, range(len(xs)), workers if sparsify_method else 1)
    if consensus:
        mixed = deltas[0].clone()
        for d in deltas[1:]:
            mixed.add_(d)
        positive = mixed >= 0  # the elected sign of each entry
        mixed.zero_()
        divisor = torch.zeros(base.shape, dtype=dtype) if normalize else None
        for d, w in zip(deltas, weights):
            agree = torch.where(positive, d > 0, d < 0)
            mixed.add_(d.mul_(agree))
            if divisor is not None:
                divisor.add_(agree, alpha=w)
        del positive, agree
        if divisor is not None:
            divisor.masked_fill_(divisor == 0, 1)
    else:
        mixed = deltas[0]  # summed in place: the first task vector is not needed apart
        for d in deltas[1:]:
            mixed.add_(d)
        total = sum(weights)
        divisor = total if abs(total) >= 1e-8 else 1.0
    del deltas
    if normalize:
        mixed.div_(divisor)
    if lam != 1:
        mixed.mul_(lam)
    return mixed.add_(base)


def model_stock(base: torch.Tensor, xs: Sequence[torch.Tensor], filter_wise: bool = False,
                workers: int = 1) -> torch.Tensor:
    """Model Stock: the base moved towards the inputs' mean by the share their angle implies.
    ``workers`` threads make the inputs' offsets and norms at once."""
    dtype = _work_dtype(base, *xs)
    shape = (-1, base.shape[-1]) if filter_wise and base.dim() > 1 else (1, -1)
    rows = base.reshape(shape)

    def offset(x: torch.Tensor) -> tuple:  # each norm once, not once per pair
        o = _difference(x.reshape(shape), rows, dtype)
        return o, o.norm(dim=-1)

    offsets, norms = zip(*_map(offset, xs, workers))
    cosines = []
    for i, a in enumerate(offsets):
        for j in range(i + 1, len(offsets)):
            product = (norms[i] * norms[j]).clamp(min=1e-6)
            cosines.append(((a * offsets[j]).sum(dim=-1) / product).clamp(-1, 1))
    del offsets, norms
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    n = len(xs)
    denominator = 1 + (n - 1) * cos
    singular = denominator.abs() < 1e-6  # no finite estimate: keep the base
    t = torch.where(singular, 0.0, n * cos / torch.where(singular, 1.0, denominator))
    # t * mean + (1 - t) * base, with the mean summed, scaled and shifted in place
    out = xs[0].reshape(shape).to(dtype, copy=True)
    for x in xs[1:]:
        out.add_(x.reshape(shape))
    out.div_(n).mul_(t).add_((1 - t) * rows)
    return out.reshape(base.shape)


# ---- parameters: mergekit's settings (scalars, gradients over layers, filters by tensor name) ---
def _is_scalar(v) -> bool:
    return isinstance(v, (bool, int, float)) and not isinstance(v, str)


def evaluate_setting(setting, tensor_name: str, t: float, flag: bool = False):
    """A parameter's value for one tensor, as mergekit's ``evaluate_setting``: a scalar; a list of
    scalars is a gradient (numbers interpolated at ``t``, flags picked); ``{filter, value}``
    entries apply when ``filter`` is in the tensor name (or absent, or ``*``); None when none does."""
    if isinstance(setting, dict):
        setting = [setting]
    if _is_scalar(setting):
        return bool(setting) if flag else float(setting)
    if not setting:
        return None
    if all(_is_scalar(v) for v in setting):
        if flag:
            return bool(setting[int(t * (len(setting) - 1))])
        scaled = t * (len(setting) - 1)
        i0 = int(scaled)
        i1, frac = min(len(setting) - 1, i0 + 1), scaled - i0
        return float((1 - frac) * setting[i0] + frac * setting[i1])
    for cond in setting:
        f = cond.get("filter")
        if f is None or f == "*" or (tensor_name and f in tensor_name):
            return evaluate_setting(cond["value"], tensor_name, t, flag)
    return None


def _resolve(name: str, scopes: Sequence[dict], default, tensor_name: str, t: float):
    for scope in scopes:  # highest precedence first
        if name in scope:
            value = evaluate_setting(scope[name], tensor_name, t, name in FLAGS)
            if value is not None:
                return value
    return default


def _check_setting(method: str, name: str, setting, where: str) -> None:
    """A setting's shape and values: refuses what mergekit would fail on or silently misread."""
    def scalars(v) -> list:
        if _is_scalar(v):
            return [v]
        if isinstance(v, list) and v and all(_is_scalar(x) for x in v):
            return v
        if isinstance(v, dict):
            if set(v) - {"filter", "value"} or "value" not in v:
                raise MergeError(f"{where}: {name}: a conditional value is {{filter: ..., value: ...}}"
                                 f", got keys {sorted(v)}")
            if v.get("filter") is not None and not isinstance(v["filter"], str):
                raise MergeError(f"{where}: {name}: filter must be a string")
            if isinstance(v["value"], (dict, list)) and not scalars_only(v["value"]):
                raise MergeError(f"{where}: {name}: a filter's value is a number or a gradient")
            return scalars(v["value"])
        if isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            return [s for x in v for s in scalars(x)]
        raise MergeError(f"{where}: {name} must be a value, a gradient (list of values) or a list "
                         f"of {{filter, value}}; got {v!r}")

    def scalars_only(v) -> bool:
        return isinstance(v, list) and v and all(_is_scalar(x) for x in v)

    for v in scalars(setting):
        if (name in FLAGS) != isinstance(v, bool):
            raise MergeError(f"{where}: {name} must be {'true or false' if name in FLAGS else 'a number'}"
                             f", got {v!r}")
        if name not in FLAGS and not math.isfinite(v):
            raise MergeError(f"{where}: {name} must be a finite number, got {v!r}")
        if name in SHARES and not 0 <= v <= 1:
            raise MergeError(f"{where}: {name} must be in [0, 1], got {v}")


def check_parameters(method: str, parameters: dict, model_parameters: Sequence[dict]) -> None:
    """Every parameter named is one of ``method``'s, in its scope, with valid values."""
    m = METHODS[method]
    known = sorted({**m.shared, **m.per_model})
    for name, setting in parameters.items():
        if name not in known:
            raise MergeError(f"{method} has no parameter {name!r} (its parameters: "
                             f"{', '.join(known) or 'none'})")
        _check_setting(method, name, setting, "parameters")
    for i, scope in enumerate(model_parameters):
        for name, setting in scope.items():
            if name in m.shared:
                raise MergeError(f"{name} is a parameter of the whole {method} merge, not of one "
                                 f"model (input {i + 1}): give it under the top-level parameters")
            if name not in m.per_model:
                raise MergeError(f"{method} has no per-model parameter {name!r} (input {i + 1}; "
                                 f"per-model parameters: {', '.join(sorted(m.per_model)) or 'none'})")
            _check_setting(method, name, setting, f"input {i + 1}")


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
def merge_units(cfg: ModelConfig, hf_format: str = "auto") -> dict:
    """Megatron key -> the ``formats.tensor_map`` row whose ``hf`` names, ``to_hf`` and
    ``to_mcore`` split one layer of it into the tensors mergekit merges on the export in
    ``hf_format`` (and join them back)."""
    layout = formats.hf_layout(cfg, hf_format)
    rows = {}
    for row in formats.tensor_map(cfg, layout):
        if layout == formats.mixtral.MODEL_TYPE and row.mcore in MIXTRAL_MODEL_TENSORS:
            row = dataclasses.replace(row, hf=(MIXTRAL_MODEL_TENSORS[row.mcore],),
                                      to_hf=formats.common.same, to_mcore=formats.common.same)
        rows[row.mcore] = row
    return rows


def _generator(seed: int, tensor_name: str, model: int) -> torch.Generator:
    """DARE's random stream for one input's tensor: the same whatever layout, order or process."""
    digest = hashlib.sha256(f"{seed}/{tensor_name}/{model}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


@dataclass
class _Merge:
    """The method with its settings: merges one tensor of every input (then the base)."""

    method: Method
    parameters: dict
    model_parameters: list
    seed: int
    workers: int = 1  # threads for the inputs' task vectors of one tensor

    def settings(self, tensor_name: str, t: float) -> tuple:
        """(shared, per-model) parameters of one HF tensor at gradient position ``t``."""
        m = self.method
        shared = {p: _resolve(p, [self.parameters], d, tensor_name, t) for p, d in m.shared.items()}
        per_model = {p: [_resolve(p, [scope, self.parameters], d, tensor_name, t)
                         for scope in self.model_parameters] for p, d in m.per_model.items()}
        return shared, per_model

    def elementwise(self, tensor_names: Sequence[str], t: float) -> bool:
        """Whether these HF tensors merge entry by entry with the same settings (no statistic
        over a tensor, no random stream per tensor name): then the Megatron tensor that holds
        them merges whole, with the same result, without splitting it and joining it back."""
        m = self.method
        if m.name not in ("linear", "task_arithmetic", "ties", "breadcrumbs", "breadcrumbs_ties",
                          "dare_linear", "dare_ties"):
            return False
        settings = [self.settings(name, t) for name in tensor_names]
        if any(s != settings[0] for s in settings[1:]):
            return False
        return m.sparsify is None or all(d >= 1 for d in settings[0][1]["density"])

    def __call__(self, tensor_name: str, t: float, xs: list) -> torch.Tensor:
        m = self.method
        shared, per_model = self.settings(tensor_name, t)
        if m.name == "slerp":
            return slerp(xs[0], xs[1], shared["t"])
        if m.name == "linear":
            weights = per_model["weight"]
            if shared["normalize"] and sum(weights) == 0:
                raise MergeError(f"{tensor_name}: the weights sum to 0, cannot normalize "
                                 f"(normalize: false)")
            return linear(xs, weights, shared["normalize"])
        *xs, base = xs
        if m.name == "model_stock":
            return model_stock(base, xs, shared["filter_wise"], self.workers)
        generators = ([_generator(self.seed, tensor_name, i) for i in range(len(xs))]
                      if m.sparsify == "random" else None)
        return task_vectors(base, xs, per_model["weight"], densities=per_model["density"],
                            sparsify_method=m.sparsify, consensus=m.consensus,
                            normalize=shared["normalize"], rescale=shared["rescale"],
                            lam=shared["lambda"], gammas=per_model.get("gamma"), generators=generators,
                            workers=self.workers)


def _merge_layer(key: str, layer: Optional[int], tensors: list, row, cfg: ModelConfig,
                 merge: _Merge, dtype: Optional[torch.dtype]) -> torch.Tensor:
    """One layer (or one whole non-layer tensor) of every input, then the base, merged tensor by
    tensor of the Hugging Face model; ``tensors`` is emptied on the way (memory)."""
    first = tensors[0]
    if not first.is_floating_point():
        if any(not torch.equal(x, first) for x in tensors[1:]):
            raise MergeError(f"{key} is not a floating-point tensor and differs between the "
                             f"inputs: it cannot be merged")
        return first
    dtype = dtype or first.dtype
    padding = first[cfg.vocab_size:].clone() if key in VOCAB_TABLES else None
    # mergekit's position of a layer in a gradient: 0 first layer .. 1 last; 0 off the layers
    t = 0.0 if layer is None else layer / (cfg.num_layers - 1) if cfg.num_layers > 1 else 1.0
    whole = row is not None and merge.elementwise(row.hf_names(layer), t)
    if row is None or whole:  # not a tensor of the HF model, or one merged entry by entry
        names = [key if row is None and layer is None else
                 f"{key}.{layer}" if row is None else row.hf_names(layer)[0]]
        parts = [(x,) for x in tensors]
        row = None if whole else row
    else:
        names = row.hf_names(layer)
        parts = [row.to_hf(cfg, x) for x in tensors]
        parts = [p if isinstance(p, tuple) else (p,) for p in parts]
    del first
    tensors.clear()  # the split copies (or views) hold what is still needed
    merged = []
    for i, name in enumerate(names):
        merged.append(merge(name, t, [p[i] for p in parts]).to(dtype))
    del parts
    out = row.to_mcore(cfg, *merged) if row is not None else merged[0]
    if padding is not None:  # no statistic saw them (the split drops them): the first input's
        out[cfg.vocab_size:] = padding
    return out


class _Ahead:
    """Work items computed in order by ``workers`` threads ahead of the caller, who takes each
    result in turn (and writes it while the next ones are read and merged). Items start while
    the bytes of those in flight stay within ``budget`` (each item alone always may): the
    largest tensor is still merged alone, so the peak memory stays that of one such merge."""

    def __init__(self, items: Sequence, compute, cost, budget: int, workers: int):
        self._items, self._compute, self._cost, self._budget = list(items), compute, cost, budget
        self._workers, self._next = workers, 0
        self._pending = collections.deque()  # (item, future, cost), in order
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="merge") if workers > 1 else None

    def _start(self) -> None:
        held = sum(c for _, _, c in self._pending)
        while self._next < len(self._items) and len(self._pending) < self._workers:
            item = self._items[self._next]
            cost = self._cost(item)
            if self._pending and held + cost > self._budget:
                return
            self._pending.append((item, self._pool.submit(self._compute, item), cost))
            held += cost
            self._next += 1

    def take(self, item):
        """The result for ``item``, the next one in order."""
        if self._pool is None:
            return self._compute(item)
        self._start()
        expected, future, _ = self._pending.popleft()
        if expected != item:
            raise RuntimeError(f"merge items out of order: {item} asked, {expected} next")
        result = future.result()
        self._start()  # the next items run while the caller writes this one
        return result

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)


def _check_inputs(method: str, n: int, has_base: bool) -> Method:
    if method not in METHODS:
        raise MergeError(f"merge method {method!r} is not supported; choose from "
                         f"{', '.join(METHODS)}")
    m = METHODS[method]
    if m.base and not has_base:
        raise MergeError(f"{method} needs a base model (--base, or base_model in the config): the "
                         f"model the inputs were fine-tuned from")
    if has_base and not m.base:
        raise MergeError(f"{method} takes no base model")
    fewest, most = m.inputs
    if most == fewest and n != most:
        raise MergeError(f"{method} merges exactly {most} models, got {n}")
    if n < fewest:
        raise MergeError(f"{method} needs at least {fewest} input models"
                         f"{' besides the base' if m.base else ''}, got {n}")
    return m


def merge_checkpoints(method: str, inputs: Sequence[str], out: str, *, base: Optional[str] = None,
                      parameters: Optional[dict] = None,
                      model_parameters: Optional[Sequence[dict]] = None, seed: int = 0,
                      dtype: Optional[torch.dtype] = None, hf_format: str = "auto",
                      name: Optional[str] = None, force: bool = False,
                      progress: bool = True, measure: bool = False,
                      workers: Optional[int] = None) -> dict:
    """Write the merge of ``inputs`` (checkpoint roots, or ``ROOT/iter_N`` directories) to ``out``.

    ``parameters`` are the method's settings for the whole merge, ``model_parameters`` one dict
    per input (``weight``, ``density``, ``gamma``), both in mergekit's form (a value, a gradient
    over layers, or filters on the HF tensor name); what is not given takes mergekit's default.
    ``seed`` seeds DARE; ``measure`` counts the bytes of tensors held at once (:class:`HeldBytes`,
    slower; one tensor at a time). ``workers`` threads (default: the CPU count, at most
    ``MAX_WORKERS``) read and merge the next tensors while one is written, and make the inputs'
    task vectors of one tensor at once. Returns a summary dict."""
    start = time.time()
    inputs = list(inputs)
    parameters = dict(parameters or {})
    model_parameters = [dict(p or {}) for p in (model_parameters or [{}] * len(inputs))]
    if len(model_parameters) != len(inputs):
        raise MergeError(f"{len(model_parameters)} sets of model parameters for {len(inputs)} inputs")
    m = _check_inputs(method, len(inputs), base is not None)
    check_parameters(method, parameters, model_parameters)
    surgery = Surgery(inputs + ([base] if base else []))
    readers = surgery.readers
    _check_output(readers, out, force)
    names = [*(f"input {i + 1} ({p})" for i, p in enumerate(inputs)), *([f"base ({base})"] * bool(base))]
    _check_compatible(readers, names)

    first = readers[0]
    cfg = first.config if name is None else first.config.replace(name=name)
    units = merge_units(first.config, hf_format)
    if workers is None:
        workers = min(MAX_WORKERS, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                      else os.cpu_count() or 1)
    workers = 1 if measure else max(1, workers)  # HeldBytes sees the ops of this thread only
    merge = _Merge(m, parameters, model_parameters, seed, workers)
    stacked, others, num_layers = surgery.stacked, surgery.others, surgery.layers
    largest = max([first.num_bytes(k) for k in others] +
                  [first.num_bytes(k) // first.shape(k)[0] for k in stacked])
    record = {"method": method, "inputs": [_describe(r) for r in readers[:len(inputs)]],
              **({"base": _describe(readers[-1])} if base else {}),
              "parameters": parameters,
              **({"model_parameters": model_parameters} if any(model_parameters) else {}),
              **({"seed": seed} if m.sparsify == "random" else {}),
              "format": formats.hf_layout(first.config, hf_format)}

    def compute(item: tuple) -> torch.Tensor:
        key, i = item
        tensors = [r.read(key) if i is None else r.read_layer(key, i) for r in readers]
        return _merge_layer(key, i, tensors, units.get(key), first.config, merge, dtype)

    def cost(item: tuple) -> int:  # the bytes of one input's tensor (the working set scales)
        key, i = item
        return first.num_bytes(key) // (1 if i is None else first.shape(key)[0])

    # Surgery.write asks for the other tensors, then layer by layer for the stacked ones
    items = [(key, None) for key in others] + [(key, i) for i in range(num_layers)
                                               for key in stacked if i < first.shape(key)[0]]
    ahead = _Ahead(items, compute, cost, max(map(cost, items), default=0), workers)

    def tensor(key: str) -> torch.Tensor:
        return ahead.take((key, None))

    def layer(i: int):  # one merged tensor at a time
        for key in stacked:
            if i < first.shape(key)[0]:
                yield key, ahead.take((key, i))

    def files(writer) -> None:
        with open(writer.path(MERGE_RECORD), "w") as f:
            json.dump(record, f, indent=2)
            f.write("\n")

    meter = HeldBytes() if measure else contextlib.nullcontext()
    try:
        with meter:  # the inputs' tokenizer and HF files travel along (the architecture is the same)
            bytes_written = surgery.write(out, cfg, tensor=tensor, layer=layer, files=files,
                                          same_model=True, force=force, progress=progress,
                                          desc=f"merge {method}")
    finally:
        ahead.close()
    return {"out": os.path.abspath(out), "method": method, "inputs": len(inputs),
            "base": base is not None, "tensors": len(stacked) + len(others), "layers": num_layers,
            "bytes": bytes_written, "seconds": time.time() - start,
            "held_peak_bytes": meter.peak if measure else None,
            "largest_tensor_bytes": largest, "peak_rss_bytes": peak_rss_bytes(), "config": cfg,
            "record": record}


def _describe(r: CheckpointReader) -> dict:
    return {"path": r.root, "iteration": r.iteration}


def summary_line(s: dict) -> str:
    mib = 2 ** 20
    held = (f"held at most {s['held_peak_bytes'] / mib:.1f} MiB at once, "
            if s["held_peak_bytes"] is not None else "")
    return (f"merge {s['method']}: {s['inputs']} inputs{' + base' if s['base'] else ''}, "
            f"{s['tensors']} tensors ({s['layers']} layers), wrote {s['out']} "
            f"({s['bytes'] / mib:.1f} MiB) in {s['seconds']:.1f}s; {held}largest tensor "
            f"{s['largest_tensor_bytes'] / mib:.1f} MiB, peak RSS {s['peak_rss_bytes'] / mib:.0f} MiB")


# ---- mergekit's YAML ----------------------------------------------------------------------------
MERGEKIT_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
CONFIG_KEYS = ("models", "slices", "base_model", "merge_method", "parameters", "dtype", "out_dtype",
               "tokenizer_source")


def read_config(path: str) -> dict:
    """A mergekit YAML config (``models`` or one full-depth ``slices`` entry, ``base_model``,
    ``merge_method``, ``parameters``, ``dtype``, ``out_dtype``) as :func:`merge_checkpoints`'s
    keyword arguments; each model is a checkpoint of ours. One line on what is not supported."""
    config = read_yaml(path, MergeError, "merge_method, models, ...")
    unsupported = {"modules": "modules (multi-module models) are not supported",
                   "tokenizer": "tokenizer: (vocabulary surgery) is not supported: the inputs "
                                "share one tokenizer, which the merge carries",
                   "chat_template": "chat_template is not supported: the merge carries the inputs' "
                                    "tokenizer and chat template"}
    for key in config:
        if key in unsupported:
            raise MergeError(f"{path}: {unsupported[key]}")
        if key not in CONFIG_KEYS:
            raise MergeError(f"{path}: unknown key {key!r} (supported: {', '.join(CONFIG_KEYS)})")
    method = config.get("merge_method")
    if not isinstance(method, str):
        raise MergeError(f"{path}: merge_method is required")
    if method not in METHODS:
        raise MergeError(f"{path}: merge_method {method!r} is not supported; choose from "
                         f"{', '.join(METHODS)}")
    models = _config_models(config, path)
    base = config.get("base_model")
    if base is not None and not isinstance(base, str):
        raise MergeError(f"{path}: base_model must be a checkpoint path")
    paths = [p for p, _ in models]
    if method == "slerp":  # mergekit interpolates from the base (t=0) to the other model (t=1)
        if base is None:
            raise MergeError(f"{path}: slerp needs a base_model (t=0) and one other model (t=1)")
        models = [(base, {})] * (base not in paths) + sorted(models, key=lambda m: m[0] != base)
        base = None
    elif not METHODS[method].base:
        if base is not None and base not in paths:
            raise MergeError(f"{path}: {method} takes no base_model (mergekit ignores it when it is "
                             f"one of the models)")
        base = None
    elif base is not None:
        models = [m for m in models if m[0] != base]  # the base's own parameters are not used
    dtype = config.get("out_dtype") or config.get("dtype")
    if dtype is not None and dtype not in MERGEKIT_DTYPES:
        raise MergeError(f"{path}: dtype {dtype!r} is not supported ({', '.join(MERGEKIT_DTYPES)})")
    parameters = config.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise MergeError(f"{path}: parameters must be a mapping")
    return {"method": method, "inputs": [p for p, _ in models], "base": base,
            "parameters": parameters, "model_parameters": [p for _, p in models],
            "dtype": DTYPES[MERGEKIT_DTYPES[dtype]] if dtype else None}


def _config_models(config: dict, path: str) -> list:
    """``[(checkpoint, parameters)]`` of ``models``, or of the sources of one slice that takes
    every layer of every model (mergekit's other way to write the same merge)."""
    if ("models" in config) == ("slices" in config):
        raise MergeError(f"{path}: give exactly one of models and slices")
    if "models" in config:
        entries = config["models"]
    else:
        slices = config["slices"]
        if not isinstance(slices, list) or len(slices) != 1 or not isinstance(slices[0], dict):
            raise MergeError(f"{path}: several slices (layer stacking, frankenmerges) are not "
                             f"supported; one slice over all layers is")
        extra = set(slices[0]) - {"sources"}
        if extra:
            raise MergeError(f"{path}: slice-level {', '.join(sorted(extra))} is not supported: "
                             f"give base_model and parameters at the top level")
        entries = slices[0].get("sources")
    if not isinstance(entries, list) or not entries:
        raise MergeError(f"{path}: models must be a list of {{model: PATH, parameters: ...}}")
    models = []
    for entry in entries:
        if isinstance(entry, str):
            entry = {"model": entry}
        if not isinstance(entry, dict) or not isinstance(entry.get("model"), str):
            raise MergeError(f"{path}: each model is {{model: PATH, parameters: ...}}, got {entry!r}")
        extra = set(entry) - {"model", "parameters", "layer_range"}
        if extra:
            raise MergeError(f"{path}: {entry['model']}: unknown key {sorted(extra)[0]!r}")
        if "layer_range" in entry:
            layers = CheckpointReader(entry["model"]).config.num_layers
            if list(entry["layer_range"]) != [0, layers]:
                raise MergeError(f"{path}: {entry['model']}: layer_range {entry['layer_range']} is "
                                 f"not all {layers} layers; slices of layers are not supported")
        elif "slices" in config:
            raise MergeError(f"{path}: {entry['model']}: a slice source needs its layer_range")
        params = entry.get("parameters") or {}
        if not isinstance(params, dict):
            raise MergeError(f"{path}: {entry['model']}: parameters must be a mapping")
        models.append((entry["model"], params))
    return models
