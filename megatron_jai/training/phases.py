"""Training phases: what data, sequence length, budget, LR schedule and RoPE each stage uses.

A run is a list of :class:`Phase`. The loop trains them in order; the phase index and the step
within it are part of every checkpoint. Between phases the optimizer state carries over, the LR
schedule restarts (its own warm-up/decay), the data blend and sequence length change, and the RoPE
of the existing model may change (base and/or position interpolation) without touching weights.

Built-in plan ``jai`` (JAI-1's continued pretraining): phase 1 English recovery, phase 2 Thai
injection (Thai at 27% of tokens), phase 3 context extension (4K -> 32K) with a larger RoPE base
and/or position interpolation. See docs/training.md for the YAML schema.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

from megatron_jai.training.faults import TrainingError


@dataclass(frozen=True)
class Phase:
    name: str
    blend: tuple  # ((weight, path_prefix), ...), weights normalised to sum 1
    seq_length: int
    train_iters: Optional[int] = None
    train_tokens: Optional[int] = None
    global_batch_size: Optional[int] = None  # None: the run's --global-batch-size
    micro_batch_size: Optional[int] = None  # None: the run's --micro-batch-size
    lr: Optional[float] = None  # None: the run's --lr (same for the fields below)
    lr_scale: float = 1.0  # multiplies the peak and minimum LR
    min_lr: Optional[float] = None
    warmup_iters: Optional[int] = None
    lr_decay_iters: Optional[int] = None  # None: the phase length
    lr_decay_style: Optional[str] = None
    rotary_base: Optional[float] = None  # None: keep the model's
    rotary_interpolation_factor: Optional[float] = None  # None: keep the model's
    recompute_activations: Optional[bool] = None  # None: the run's --recompute-activations
    dataset_names: tuple = field(default=())  # a label per blend entry (per-dataset loss)
    # Validation data of the phase, like ``blend`` (its own datasets: never carved out of the
    # training data, so turning validation on or off never changes what training sees).
    valid_blend: tuple = field(default=())
    valid_dataset_names: tuple = field(default=())

    def iterations(self, global_batch_size: int) -> int:
        """Steps in this phase: ``train_iters``, or the token budget rounded up to whole steps."""
        if self.train_iters is not None:
            return self.train_iters
        return math.ceil(self.train_tokens / (global_batch_size * self.seq_length))


_PHASE_KEYS = {"name", "blend", "valid_blend", "seq_length", "train_iters", "train_tokens", "global_batch_size",
               "micro_batch_size", "lr", "lr_scale", "min_lr", "warmup_iters", "lr_decay_iters",
               "lr_decay_style", "rotary_base", "rotary_interpolation_factor",
               "recompute_activations"}


def resolve_blend(blend, datasets: dict, where: str) -> tuple[tuple, tuple]:
    """A phase's blend as a config or flag writes it -> dataset prefixes with normalised weights,
    and their labels. ``blend``: ``{name_or_prefix: weight}``, ``[[weight, name_or_prefix], ...]``
    or one prefix.

    The training side of a blend: names are looked up in ``datasets`` (the config's ``data:``
    section), mapping values are *relative* weights (normalised, unlike the target ratios of
    :func:`megatron_jai.data.datasets.normalize_blend`'s mapping form), and a weight of 0 leaves a
    dataset out. Parsing and validating the weights is the data package's (one parser); its errors
    come back as :class:`TrainingError` prefixed with ``where``. Returns
    ``(((weight, prefix), ...), (label, ...))`` with weights normalised to sum 1.
    """
    from megatron_jai.data.datasets import DatasetError, normalize_blend

    if isinstance(blend, str):
        items = [(1.0, blend)]
    elif isinstance(blend, dict):
        items = [(weight, name) for name, weight in blend.items()]
    elif isinstance(blend, (list, tuple)):
        items = []
        for entry in blend:
            if not (isinstance(entry, (list, tuple)) and len(entry) == 2):
                raise TrainingError(f"{where}: blend entries must be [weight, path_prefix] pairs")
            items.append((entry[0], entry[1]))
    else:
        raise TrainingError(f"{where}: blend must be a mapping name -> weight, a list of "
                            f"[weight, prefix] pairs or one path prefix")
    items = [(weight, name) for weight, name in items if not _is_zero(weight)]
    if not items:
        raise TrainingError(f"{where}: the blend has no dataset with a positive weight")
    names = [str(name) for _, name in items]
    try:
        prefixes, weights = normalize_blend(
            [(weight, str(datasets.get(name, name))) for (weight, _), name in zip(items, names)])
    except DatasetError as err:
        raise TrainingError(f"{where}: {err}") from None
    labels = tuple(name if name in datasets else _label(prefix)
                   for name, prefix in zip(names, prefixes))
    return tuple(zip(weights or [1.0], prefixes)), labels


def _is_zero(weight) -> bool:
    try:
        return float(weight) == 0
    except (TypeError, ValueError):
        return False  # not a number: normalize_blend says so


def _label(prefix: str) -> str:
    import os

    base = os.path.basename(prefix.rstrip("/"))
    for suffix in ("_text_document", "_document"):
        if base.endswith(suffix):
            base = base[: -len(suffix)]
    return base or prefix


def phase_from_dict(d: dict, datasets: dict, index: int,
                    valid_datasets: Optional[dict] = None) -> Phase:
    where = f"phase {index + 1}"
    if not isinstance(d, dict):
        raise TrainingError(f"{where}: a phase must be a mapping")
    d = {k.replace("-", "_"): v for k, v in d.items()}
    unknown = set(d) - _PHASE_KEYS
    if unknown:
        raise TrainingError(f"{where}: unknown keys {sorted(unknown)}; allowed: {sorted(_PHASE_KEYS)}")
    for key in ("blend", "seq_length"):
        if key not in d:
            raise TrainingError(f"{where}: missing {key!r}")
    if (d.get("train_iters") is None) == (d.get("train_tokens") is None):
        raise TrainingError(f"{where}: give exactly one of train_iters or train_tokens")
    blend, labels = resolve_blend(d.pop("blend"), datasets, where)
    valid, valid_labels = ((), ())
    if d.get("valid_blend") is not None:
        valid, valid_labels = resolve_blend(d.pop("valid_blend"), valid_datasets or datasets,
                                              f"{where} valid_blend")
    d.pop("valid_blend", None)
    phase = Phase(name=str(d.pop("name", f"phase{index + 1}")), blend=blend, dataset_names=labels,
                  valid_blend=valid, valid_dataset_names=valid_labels,
                  **{k: _number(k, v, where) for k, v in d.items()})
    validate_phase(phase, where)
    return phase


_INT_KEYS = {"seq_length", "train_iters", "train_tokens", "global_batch_size", "micro_batch_size",
             "warmup_iters", "lr_decay_iters"}


def _number(key, value, where):
    if value is None or key == "lr_decay_style":
        return value
    if key == "recompute_activations":
        if not isinstance(value, bool):
            raise TrainingError(f"{where}: recompute_activations must be true or false")
        return value
    try:
        return int(value) if key in _INT_KEYS else float(value)
    except (TypeError, ValueError):
        raise TrainingError(f"{where}: {key} must be a number, got {value!r}") from None


_SCHEDULE_RULES = (
    ("lr", "a finite number > 0", lambda v: math.isfinite(v) and v > 0),
    ("min_lr", "a finite number >= 0", lambda v: math.isfinite(v) and v >= 0),
    ("lr_scale", "a finite number > 0", lambda v: math.isfinite(v) and v > 0),
    ("warmup_iters", "an integer >= 0", lambda v: v >= 0),
    ("lr_decay_iters", "an integer >= 0", lambda v: v >= 0),
)


def validate_phase(phase: Phase, where: str) -> None:
    for key in ("seq_length", "train_iters", "train_tokens", "global_batch_size",
                "micro_batch_size"):
        value = getattr(phase, key)
        if value is not None and value <= 0:
            raise TrainingError(f"{where}: {key} must be positive")
    for key, rule, valid in _SCHEDULE_RULES:
        value = getattr(phase, key)
        if value is not None and not valid(value):
            raise TrainingError(f"{where}: {key} must be {rule}, got {value!r}")
    if phase.lr is not None and phase.min_lr is not None and phase.min_lr > phase.lr:
        raise TrainingError(f"{where}: min_lr {phase.min_lr:g} is above lr {phase.lr:g}: the "
                            f"minimum learning rate must be <= the peak")
    if phase.rotary_base is not None and phase.rotary_base <= 1:
        raise TrainingError(f"{where}: rotary_base must be > 1")
    if phase.rotary_interpolation_factor is not None and phase.rotary_interpolation_factor < 1:
        raise TrainingError(f"{where}: rotary_interpolation_factor must be >= 1")


# ---- the built-in plan -------------------------------------------------------------------------
JAI_PLAN_DEFAULTS = {
    # Steps (or tokens) per phase; give phase_iters or phase_tokens.
    "phase_iters": None,
    "phase_tokens": None,
    "seq_length": 4096,
    "long_seq_length": 32768,
    "thai_share": 0.27,
    # Phase 1 keeps a little Thai so the new embeddings are not forgotten; 0 = English only.
    "phase1_thai_share": 0.0,
    # Context extension: "rope_base" (raise the base), "interpolation" (divide positions by
    # long/short) or "both".
    "context_extension": "rope_base",
    "long_rotary_base": 500000.0,
    "lr": None,  # None: the run's --lr (same for min_lr / warmup_iters)
    "min_lr": None,
    "warmup_iters": None,
    "phase3_lr_scale": 0.5,  # phase 3 peak LR relative to the others (short, gentle)
    # Full activation recompute in phase 3 (32K activations do not fit otherwise at 75B).
    "long_recompute_activations": True,
}


def jai_plan(datasets: dict, valid_datasets: Optional[dict] = None, **options) -> list[Phase]:
    """JAI-1's three phases on the named datasets ``english`` and ``thai`` (config ``data:``).
    With ``english`` and ``thai`` in the config's ``valid_data:``, each phase validates on the
    same mix of those."""
    unknown = set(options) - set(JAI_PLAN_DEFAULTS)
    if unknown:
        raise TrainingError(f"plan jai: unknown options {sorted(unknown)}; "
                            f"allowed: {sorted(JAI_PLAN_DEFAULTS)}")
    o = {**JAI_PLAN_DEFAULTS, **options}
    for name in ("english", "thai"):
        if name not in datasets:
            raise TrainingError(f"plan jai needs a dataset named {name!r} in the config's data: "
                                f"section (got {sorted(datasets)})")
    if (o["phase_iters"] is None) == (o["phase_tokens"] is None):
        raise TrainingError("plan jai: give exactly one of phase_iters or phase_tokens "
                            "(three numbers, one per phase)")
    budgets = o["phase_iters"] if o["phase_iters"] is not None else o["phase_tokens"]
    if not isinstance(budgets, (list, tuple)) or len(budgets) != 3:
        raise TrainingError("plan jai: phase_iters / phase_tokens must list three numbers")
    budget_key = "train_iters" if o["phase_iters"] is not None else "train_tokens"
    if not 0 < o["thai_share"] < 1 or not 0 <= o["phase1_thai_share"] < 1:
        raise TrainingError("plan jai: thai shares must be fractions in [0, 1)")
    mode = o["context_extension"]
    if mode not in ("rope_base", "interpolation", "both"):
        raise TrainingError("plan jai: context_extension must be rope_base, interpolation or both")
    short, long_ = int(o["seq_length"]), int(o["long_seq_length"])
    if long_ < short:
        raise TrainingError("plan jai: long_seq_length must be >= seq_length")

    def mix(thai):
        d = {"english": 1.0 - thai}
        if thai > 0:
            d["thai"] = thai
        return d

    def blend(thai):
        return resolve_blend(mix(thai), datasets, "plan jai")

    def valid(thai):
        if not valid_datasets:
            return {}
        missing = [name for name in mix(thai) if name not in valid_datasets]
        if missing:
            raise TrainingError(f"plan jai: valid_data: needs datasets named {missing}")
        entries, labels = resolve_blend(mix(thai), valid_datasets, "plan jai valid_data")
        return {"valid_blend": entries, "valid_dataset_names": labels}

    lr = {k: _number(k, o[k], "plan jai") for k in ("lr", "min_lr", "warmup_iters")
          if o[k] is not None}
    long_lr = {**lr, "lr_scale": _number("lr_scale", o["phase3_lr_scale"], "plan jai phase3_lr_scale"),
               "recompute_activations": bool(o["long_recompute_activations"])}
    specs = [
        ("english-recovery", blend(o["phase1_thai_share"]), short,
         valid(o["phase1_thai_share"]), lr),
        ("thai-injection", blend(o["thai_share"]), short, valid(o["thai_share"]), lr),
        ("context-extension", blend(o["thai_share"]), long_, {**valid(o["thai_share"]), 
            "rotary_base": float(o["long_rotary_base"]) if mode in ("rope_base", "both") else None,
            "rotary_interpolation_factor": long_ / short if mode in ("interpolation", "both")
            else None,
        }, long_lr),
    ]
    phases = []
    for i, (name, (entries, labels), seq, rope, lr_kw) in enumerate(specs):
        phase = Phase(name=name, blend=entries, dataset_names=labels, seq_length=seq,
                      **{budget_key: int(budgets[i])}, **rope, **lr_kw)
        validate_phase(phase, f"plan jai phase {i + 1}")
        phases.append(phase)
    return phases


PLANS = {"jai": jai_plan}


def build_phases(config_phases, plan, datasets: dict,
                 valid_datasets: Optional[dict] = None) -> Optional[list[Phase]]:
    """Phases from a config's ``phases:`` list or ``plan:`` (name or ``{name: jai, ...}``);
    ``valid_datasets`` is the config's ``valid_data:`` section."""
    if config_phases is not None and plan is not None:
        raise TrainingError("give either phases: or plan: in the config, not both")
    if config_phases is not None:
        if not isinstance(config_phases, list) or not config_phases:
            raise TrainingError("phases: must be a non-empty list")
        return [phase_from_dict(p, datasets, i, valid_datasets)
                for i, p in enumerate(config_phases)]
    if plan is not None:
        if isinstance(plan, str):
            name, options = plan, {}
        elif isinstance(plan, dict) and "name" in plan:
            options = dict(plan)
            name = options.pop("name")
        else:
            raise TrainingError("plan: must be a plan name or a mapping with a name: key")
        if name not in PLANS:
            raise TrainingError(f"unknown plan {name!r}; built-in plans: {sorted(PLANS)}")
        return PLANS[name](datasets, valid_datasets=valid_datasets, **options)
    return None


# ---- RoPE changes on a live model --------------------------------------------------------------
def apply_rope(model, rotary_base: float, interpolation_factor: Optional[float]) -> bool:
    """Give ``model`` (a ``JaiGPTModel`` stage) a RoPE with this base / interpolation factor.

    RoPE has no weights: Megatron-Core's ``RotaryEmbedding`` is rebuilt with the new settings (a
    fresh module also drops its per-sequence-length cache) and ``model.jai_config`` is updated so
    the next checkpoint's model_config.json records it. Returns True if anything changed.
    """
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    cfg = model.jai_config
    if cfg.rotary_base == rotary_base and cfg.rotary_interpolation_factor == interpolation_factor:
        return False
    old = model.rotary_pos_emb
    if type(old) is not RotaryEmbedding:
        raise TrainingError(f"cannot change RoPE of a {type(old).__name__}")
    config = model.config
    model.rotary_pos_emb = RotaryEmbedding(
        kv_channels=config.kv_channels,
        rotary_percent=1.0,
        rotary_interleaved=config.rotary_interleaved,
        seq_len_interpolation_factor=interpolation_factor,
        rotary_base=rotary_base,
        use_cpu_initialization=config.use_cpu_initialization,
        cp_group=old.cp_group,
    ).to(old.inv_freq.device)
    model.jai_config = cfg.replace(rotary_base=float(rotary_base),
                                   rotary_interpolation_factor=interpolation_factor)
    return True
