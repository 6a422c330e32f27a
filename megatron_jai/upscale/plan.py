"""DUS.v2 layer plans: which base layer each new layer copies, and the long-range skips.

A plan cuts the base model into consecutive blocks of ``block_size`` layers and repeats block ``k``
``multiplicities[k]`` times (whole-block repetition, the Solar / JAI-1 layout). Skip connections
blend the hidden state entering one new layer into the input of a later one:
``h <- alpha * h_saved + (1 - alpha) * h`` (alpha_train in training, alpha_infer at inference).

``skips: repeat`` (the default) derives them from the multiplicities: for every repeated block,
the input of its first copy is blended into the input of each later copy. For Phi-3-medium with
multiplicities [1,1,1,2,3,3,2,1,1,1] this gives exactly JAI-1's skips 12->16, 20->24, 20->28,
32->36, 32->40, 44->48. Plans are the single source of truth for the skips: the ``jai-75b`` model
preset takes them from the built-in plan ``phi3-medium-jai``.

A plan file (YAML or JSON)::

    name: my-plan
    base_layers: 8
    block_size: 2
    multiplicities: [1, 2, 2, 1]
    skips: repeat            # or [] (none), or a list of {source, target[, alpha_train, alpha_infer]}
    alpha_train: 0.9         # defaults for derived / unspecified skips
    alpha_infer: 0.8
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Optional, Sequence, Union

from megatron_jai.cli import UserError

# megatron_jai.config takes the jai-75b preset's skips from the plans here (and re-exports
# SkipConnection and pipeline_stage_layers), so this module never imports megatron_jai.config.

DEFAULT_ALPHA_TRAIN = 0.9
DEFAULT_ALPHA_INFER = 0.8


@dataclass(frozen=True)
class SkipConnection:
    """DUS.v2 long-range skip: the hidden state entering ``source`` is blended into the input of
    ``target``: ``h <- alpha * h_saved + (1 - alpha) * h``. alpha 0 turns the skip off."""

    source: int
    target: int
    alpha_train: float = DEFAULT_ALPHA_TRAIN
    alpha_infer: float = DEFAULT_ALPHA_INFER


class PlanError(UserError):
    """An invalid layer plan (bad sizes, skips out of range, unreadable file)."""


@dataclass(frozen=True)
class LayerPlan:
    name: str
    base_layers: int
    block_size: int
    multiplicities: tuple
    skip_connections: tuple = ()

    def __post_init__(self):
        if self.block_size < 1 or self.base_layers < 1:
            raise PlanError(f"plan {self.name!r}: block_size and base_layers must be positive")
        if self.block_size * len(self.multiplicities) != self.base_layers:
            raise PlanError(
                f"plan {self.name!r}: {len(self.multiplicities)} blocks of {self.block_size} layers "
                f"cover {self.block_size * len(self.multiplicities)} layers, but the base model "
                f"has {self.base_layers}")
        if any(int(m) != m or m < 0 for m in self.multiplicities):
            raise PlanError(f"plan {self.name!r}: multiplicities must be integers >= 0")
        if self.num_layers < 1:
            raise PlanError(f"plan {self.name!r}: the new model would have no layers")
        seen = set()
        for s in self.skip_connections:
            if not 0 <= s.source < s.target < self.num_layers:
                raise PlanError(f"plan {self.name!r}: skip {s.source}->{s.target} needs "
                                f"0 <= source < target < {self.num_layers}")
            if not (0.0 <= s.alpha_train <= 1.0 and 0.0 <= s.alpha_infer <= 1.0):
                raise PlanError(f"plan {self.name!r}: skip {s.source}->{s.target}: alphas must "
                                f"lie in [0, 1]")
            if (s.source, s.target) in seen:
                raise PlanError(f"plan {self.name!r}: skip {s.source}->{s.target} given twice")
            seen.add((s.source, s.target))

    @property
    def num_layers(self) -> int:
        return self.block_size * sum(self.multiplicities)

    def layer_map(self) -> list:
        """``layer_map()[i]`` = the base layer that new layer ``i`` is a copy of."""
        out = []
        for block, mult in enumerate(self.multiplicities):
            first = block * self.block_size
            for _ in range(mult):
                out.extend(range(first, first + self.block_size))
        return out

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "base_layers": self.base_layers,
            "block_size": self.block_size,
            "multiplicities": list(self.multiplicities),
            "skips": [{"source": s.source, "target": s.target, "alpha_train": s.alpha_train,
                       "alpha_infer": s.alpha_infer} for s in self.skip_connections],
        }

    def describe(self) -> str:
        skips = ", ".join(f"{s.source}->{s.target}" for s in self.skip_connections) or "none"
        return (f"plan {self.name}: {self.base_layers} -> {self.num_layers} layers "
                f"(blocks of {self.block_size}, multiplicities {list(self.multiplicities)}), "
                f"skips {skips}")


def repeat_skips(block_size: int, multiplicities: Sequence[int],
                 alpha_train: float = DEFAULT_ALPHA_TRAIN,
                 alpha_infer: float = DEFAULT_ALPHA_INFER) -> tuple:
    """The skips of a repeated block: its first copy's input -> each later copy's input."""
    skips, start = [], 0
    for mult in multiplicities:
        for copy in range(1, mult):
            skips.append(SkipConnection(start, start + copy * block_size, alpha_train, alpha_infer))
        start += mult * block_size
    return tuple(sorted(skips, key=lambda s: (s.source, s.target)))


def make_plan(name: str, base_layers: int, block_size: int, multiplicities: Sequence[int],
              skips: Union[str, Sequence, None] = "repeat",
              alpha_train: float = DEFAULT_ALPHA_TRAIN,
              alpha_infer: float = DEFAULT_ALPHA_INFER) -> LayerPlan:
    """Build a plan; ``skips`` is ``"repeat"`` (derived), ``None``/``[]`` (none), or a list of
    ``SkipConnection`` / ``{source, target[, alpha_train, alpha_infer]}`` / ``[source, target]``."""
    multiplicities = tuple(int(m) for m in multiplicities)
    if skips == "repeat":
        conns = repeat_skips(block_size, multiplicities, alpha_train, alpha_infer)
    elif skips in (None, "none"):
        conns = ()
    elif isinstance(skips, str):
        raise PlanError(f"plan {name!r}: skips must be 'repeat', 'none' or a list, not {skips!r}")
    else:
        items = []
        for s in skips:
            if isinstance(s, SkipConnection):
                items.append(s)
            elif isinstance(s, dict):
                unknown = set(s) - {"source", "target", "alpha_train", "alpha_infer"}
                if unknown or not {"source", "target"} <= set(s):
                    raise PlanError(f"plan {name!r}: a skip needs source and target (and "
                                    f"optionally alpha_train, alpha_infer), got {s}")
                items.append(SkipConnection(int(s["source"]), int(s["target"]),
                                            float(s.get("alpha_train", alpha_train)),
                                            float(s.get("alpha_infer", alpha_infer))))
            elif isinstance(s, (list, tuple)) and len(s) == 2:
                items.append(SkipConnection(int(s[0]), int(s[1]), alpha_train, alpha_infer))
            else:
                raise PlanError(f"plan {name!r}: cannot read skip {s!r}")
        conns = tuple(sorted(items, key=lambda c: (c.source, c.target)))
    return LayerPlan(name, int(base_layers), int(block_size), multiplicities, conns)


# Built-in plans. JAI-1 / Solar-Pro layout on Phi-3-medium: 40 -> 64 layers.
PLAN_SPECS = {
    "phi3-medium-jai": {"base_layers": 40, "block_size": 4,
                        "multiplicities": [1, 1, 1, 2, 3, 3, 2, 1, 1, 1], "skips": "repeat"},
}


def get_plan(name: str) -> "LayerPlan":
    """A built-in plan by name."""
    try:
        spec = PLAN_SPECS[name]
    except KeyError:
        raise PlanError(f"unknown plan {name!r}; built-in: {', '.join(sorted(PLAN_SPECS))}") from None
    return plan_from_dict(dict(spec, name=name))


def plan_from_dict(d: dict, default_name: str = "custom") -> LayerPlan:
    if not isinstance(d, dict):
        raise PlanError("a plan file must hold a mapping (name, base_layers, block_size, "
                        "multiplicities, skips)")
    known = {"name", "base_layers", "block_size", "multiplicities", "skips", "alpha_train",
             "alpha_infer"}
    unknown = set(d) - known
    if unknown:
        raise PlanError(f"unknown plan fields {sorted(unknown)}; known: {sorted(known)}")
    missing = {"block_size", "multiplicities"} - set(d)
    if missing:
        raise PlanError(f"plan is missing {sorted(missing)}")
    block_size, mults = d["block_size"], d["multiplicities"]
    if not isinstance(block_size, int) or not isinstance(mults, list) or \
            not all(isinstance(m, int) for m in mults):
        raise PlanError("plan: block_size must be an integer and multiplicities a list of integers")
    return make_plan(str(d.get("name", default_name)),
                     int(d.get("base_layers", block_size * len(mults))), block_size, mults,
                     skips=d.get("skips", "repeat"),
                     alpha_train=float(d.get("alpha_train", DEFAULT_ALPHA_TRAIN)),
                     alpha_infer=float(d.get("alpha_infer", DEFAULT_ALPHA_INFER)))


def load_plan(spec: str) -> LayerPlan:
    """A plan by name (``phi3-medium-jai``) or from a YAML/JSON file."""
    if spec in PLAN_SPECS:
        return get_plan(spec)
    if not os.path.isfile(spec):
        raise PlanError(f"{spec!r} is neither a built-in plan ({', '.join(sorted(PLAN_SPECS))}) "
                        f"nor a plan file")
    with open(spec) as f:
        text = f.read()
    try:
        if spec.endswith(".json"):
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as e:  # noqa: BLE001 - any parse error is a user error here
        raise PlanError(f"cannot parse plan file {spec}: {e}") from None
    name = os.path.splitext(os.path.basename(spec))[0]
    return plan_from_dict(data, default_name=name)


def save_plan(plan: LayerPlan, path: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(plan.to_dict(), f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


# ---- pipeline layouts ------------------------------------------------------------------------
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


def crossing_skips(skips: Sequence[SkipConnection], boundaries: Sequence[int]) -> list:
    """Skips whose saved state must travel between stages (a boundary b with source < b <= target)."""
    return [s for s in skips if any(s.source < b <= s.target for b in boundaries)]


def stage_local_layouts(num_layers: int, skips: Sequence[SkipConnection], pp: int) -> list:
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
