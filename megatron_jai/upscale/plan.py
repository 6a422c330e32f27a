"""DUS.v2 layer plans: which base layer each new layer copies, and the long-range skips.

A plan cuts the base model into consecutive blocks of ``block_size`` layers and repeats block ``k``
``multiplicities[k]`` times (whole-block repetition, the Solar / JAI-1 layout). Skip connections
blend the hidden state entering one new layer into the input of a later one:
``h <- alpha * h_saved + (1 - alpha) * h`` (alpha_train in training, alpha_infer at inference).

``skips: repeat`` (the default) derives them from the multiplicities: for every repeated block,
the input of its first copy is blended into the input of each later copy. For Phi-3-medium with
multiplicities [1,1,1,2,3,3,2,1,1,1] this gives exactly JAI-1's skips 12->16, 20->24, 20->28,
32->36, 32->40, 44->48: the built-in plan ``phi3-medium-jai`` and the ``jai-75b`` model preset
share that one layout (:data:`megatron_jai.presets.PHI3_MEDIUM_JAI_PLAN`). The skip type and its
checks live in :mod:`megatron_jai.config`, pipeline splits in :mod:`megatron_jai.parallel`.

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
from typing import Sequence, Union

from megatron_jai.cli import UserError
from megatron_jai.config import (DEFAULT_ALPHA_INFER, DEFAULT_ALPHA_TRAIN, ModelConfigError,
                                 SkipConnection, check_skips, repeat_skips)
from megatron_jai.presets import PHI3_MEDIUM_JAI_PLAN


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
        try:
            check_skips(self.skip_connections, self.num_layers)
        except ModelConfigError as e:
            raise PlanError(f"plan {self.name!r}: {e}") from None

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
            "skips": [s.to_dict() for s in self.skip_connections],
        }

    def describe(self) -> str:
        skips = ", ".join(f"{s.source}->{s.target}" for s in self.skip_connections) or "none"
        return (f"plan {self.name}: {self.base_layers} -> {self.num_layers} layers "
                f"(blocks of {self.block_size}, multiplicities {list(self.multiplicities)}), "
                f"skips {skips}")


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
                try:
                    items.append(SkipConnection.from_dict(s, alpha_train, alpha_infer))
                except ModelConfigError as e:
                    raise PlanError(f"plan {name!r}: {e}") from None
            elif isinstance(s, (list, tuple)) and len(s) == 2:
                items.append(SkipConnection(int(s[0]), int(s[1]), alpha_train, alpha_infer))
            else:
                raise PlanError(f"plan {name!r}: cannot read skip {s!r}")
        conns = tuple(sorted(items, key=lambda c: (c.source, c.target)))
    return LayerPlan(name, int(base_layers), int(block_size), multiplicities, conns)


# Built-in plans. JAI-1 / Solar-Pro layout on Phi-3-medium: 40 -> 64 layers.
PLAN_SPECS = {"phi3-medium-jai": PHI3_MEDIUM_JAI_PLAN}


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
