"""Model configuration: one dataclass, its DUS.v2 skip connections, parameter counts, and the
Megatron-Core view.

``ModelConfig`` describes the *architecture* only (what a checkpoint needs to be rebuilt); how it is
split over GPUs (TP/PP/EP) is chosen at run time and passed to :meth:`ModelConfig.transformer_config`.
It is saved as ``model_config.json`` next to every checkpoint and checks itself when it is made
(a hand-edited file included). The named presets live in :mod:`megatron_jai.presets`.
"""
from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from megatron_jai.cli import UserError
from megatron_jai.parallel import pipeline_stage_layers

DEFAULT_ALPHA_TRAIN = 0.9
DEFAULT_ALPHA_INFER = 0.8


class ModelConfigError(UserError):
    """A model configuration that cannot describe a model (one line naming the field)."""


@dataclass(frozen=True)
class SkipConnection:
    """DUS.v2 long-range skip: the hidden state entering ``source`` is blended into the input of
    ``target``: ``h <- alpha * h_saved + (1 - alpha) * h``. alpha 0 turns the skip off."""

    source: int
    target: int
    alpha_train: float = DEFAULT_ALPHA_TRAIN
    alpha_infer: float = DEFAULT_ALPHA_INFER

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d, alpha_train: Optional[float] = DEFAULT_ALPHA_TRAIN,
                  alpha_infer: Optional[float] = DEFAULT_ALPHA_INFER) -> "SkipConnection":
        """The skip of ``{source, target[, alpha_train, alpha_infer]}``: a missing alpha takes the
        default given here (``None``: the alpha is required)."""
        defaults = {"alpha_train": alpha_train, "alpha_infer": alpha_infer}
        required = ("source", "target", *(k for k, v in defaults.items() if v is None))
        optional = ", ".join(k for k, v in defaults.items() if v is not None)
        if not isinstance(d, dict) or set(d) - {"source", "target", *defaults} or \
                set(required) - set(d):
            optional = f" (and optionally {optional})" if optional else ""
            raise ModelConfigError(f"a skip needs {', '.join(required[:-1])} and {required[-1]}"
                                   f"{optional}, got {d}")
        try:
            return cls(int(d["source"]), int(d["target"]),
                       *(float(d.get(k, v)) for k, v in defaults.items()))
        except (TypeError, ValueError):
            raise ModelConfigError(f"a skip's source and target are layer numbers and its alphas "
                                   f"numbers, got {d}") from None


def check_skips(skips: Sequence[SkipConnection], num_layers: int) -> None:
    """``ModelConfigError`` naming the first skip that does not fit a ``num_layers``-layer model:
    out of range, an alpha outside [0, 1], or given twice."""
    seen = set()
    for s in skips:
        if not isinstance(s, SkipConnection):
            raise ModelConfigError(f"{s!r} is not a SkipConnection")
        if not 0 <= s.source < s.target < num_layers:
            raise ModelConfigError(f"skip {s.source}->{s.target} needs 0 <= source < target < "
                                   f"{num_layers}")
        if not (0.0 <= s.alpha_train <= 1.0 and 0.0 <= s.alpha_infer <= 1.0):
            raise ModelConfigError(f"skip {s.source}->{s.target}: alphas must lie in [0, 1]")
        if (s.source, s.target) in seen:
            raise ModelConfigError(f"skip {s.source}->{s.target} given twice")
        seen.add((s.source, s.target))


def repeat_skips(block_size: int, multiplicities: Sequence[int],
                 alpha_train: float = DEFAULT_ALPHA_TRAIN,
                 alpha_infer: float = DEFAULT_ALPHA_INFER) -> tuple:
    """The skips of a repeated block (DUS.v2): its first copy's input -> each later copy's input."""
    skips, start = [], 0
    for mult in multiplicities:
        for copy in range(1, mult):
            skips.append(SkipConnection(start, start + copy * block_size, alpha_train, alpha_infer))
        start += mult * block_size
    return tuple(sorted(skips, key=lambda s: (s.source, s.target)))


# The value types of ModelConfig's fields, as annotated (``Optional[...]`` also takes None).
_FIELD_TYPES = {"int": numbers.Integral, "float": numbers.Real, "bool": bool, "str": str,
                "tuple": tuple}
_AT_LEAST_ONE = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups",
                 "ffn_hidden_size", "vocab_size", "max_position_embeddings", "kv_channels",
                 "make_vocab_size_divisible_by", "moe_ffn_hidden_size")
DROP_POLICIES = ("probs", "position")


@dataclass(frozen=True)
class ModelConfig:
    name: str
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    ffn_hidden_size: int
    vocab_size: int  # rows that carry meaning (tokenizer vocab incl. specials / HF padding)
    max_position_embeddings: int = 4096
    rotary_base: float = 10000.0
    # RoPE position interpolation (context extension): positions are divided by this factor.
    rotary_interpolation_factor: Optional[float] = None
    norm_epsilon: float = 1e-5
    kv_channels: Optional[int] = None  # default hidden_size // num_attention_heads
    tie_embeddings: bool = False
    init_method_std: float = 0.02
    # Rows of the embedding/output tables are padded to a multiple of this, independently of TP,
    # so a checkpoint reshards to any TP that divides it.
    make_vocab_size_divisible_by: int = 128
    # MoE (0 experts = dense FFN everywhere).
    num_experts: int = 0
    moe_top_k: int = 2
    moe_ffn_hidden_size: Optional[int] = None  # default ffn_hidden_size
    moe_normalize_topk: bool = True
    moe_aux_loss_coeff: float = 1e-2
    moe_z_loss_coeff: float = 1e-3
    moe_capacity_factor: Optional[float] = None  # None = dropless
    moe_token_drop_policy: str = "probs"  # with a capacity: drop lowest-probability ("probs") or latest ("position")
    moe_expert_bias: bool = False  # aux-loss-free balancing: a per-expert bias on the selection scores
    moe_expert_bias_update_rate: float = 1e-3
    # DUS.v2 skip connections (global layer indices, 0-based).
    skip_connections: tuple = ()

    # ---- derived sizes -------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    @property
    def padded_vocab_size(self) -> int:
        m = self.make_vocab_size_divisible_by
        return int(math.ceil(self.vocab_size / m) * m)

    @property
    def expert_ffn_hidden_size(self) -> int:
        return self.moe_ffn_hidden_size or self.ffn_hidden_size

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    # ---- parameter counts ----------------------------------------------------------------------
    def parameter_counts(self) -> dict:
        """Parameters (unpadded vocabulary): ``total`` and ``active`` (per token, top-k experts)."""
        h, d = self.hidden_size, self.head_dim
        attention = h * d * self.num_attention_heads * 2 + 2 * h * d * self.num_query_groups
        norms = 2 * h
        dense_ffn = 3 * h * self.ffn_hidden_size
        expert_ffn = 3 * h * self.expert_ffn_hidden_size
        if self.is_moe:
            ffn_total = self.num_experts * expert_ffn + h * self.num_experts  # + router
            ffn_active = self.moe_top_k * expert_ffn + h * self.num_experts
        else:
            ffn_total = ffn_active = dense_ffn
        embeddings = self.vocab_size * h * (1 if self.tie_embeddings else 2) + h  # + final norm
        total = self.num_layers * (attention + norms + ffn_total) + embeddings
        active = self.num_layers * (attention + norms + ffn_active) + embeddings
        return {"total": total, "active": active}

    def flops_per_token(self, seq_length: int) -> float:
        """Training FLOPs per token, PaLM convention: 6 * active matmul parameters (the input
        embedding is a lookup) + 12 * layers * heads * head_dim * seq_length for attention."""
        n = self.parameter_counts()["active"] - self.vocab_size * self.hidden_size
        attn = 12 * self.num_layers * self.num_attention_heads * self.head_dim * seq_length
        return 6.0 * n + attn

    # ---- checks --------------------------------------------------------------------------------
    def __post_init__(self):
        def bad(field: str, why: str):
            return ModelConfigError(f"model config {self.name!r}: {field} {why}")

        for f in dataclasses.fields(self):
            value, kind = getattr(self, f.name), f.type
            if kind.startswith("Optional["):
                if value is None:
                    continue
                kind = kind[len("Optional["):-1]
            if not isinstance(value, _FIELD_TYPES[kind]) or \
                    (isinstance(value, bool) and kind != "bool"):
                raise bad(f.name, f"must be {'a number' if kind == 'float' else f'of type {kind}'}, "
                                  f"got {value!r}")
        for field in _AT_LEAST_ONE:
            if getattr(self, field) is not None and getattr(self, field) < 1:
                raise bad(field, f"must be at least 1, got {getattr(self, field)}")
        for field in ("rotary_interpolation_factor", "moe_capacity_factor"):
            if getattr(self, field) is not None and not getattr(self, field) > 0:
                raise bad(field, f"must be positive (or null), got {getattr(self, field)}")
        if self.num_attention_heads % self.num_query_groups:
            raise bad("num_query_groups", f"({self.num_query_groups}) must divide "
                                          f"num_attention_heads ({self.num_attention_heads})")
        if self.num_experts < 0:
            raise bad("num_experts", f"must be >= 0 (0 = dense), got {self.num_experts}")
        if self.is_moe and not 1 <= self.moe_top_k <= self.num_experts:
            raise bad("moe_top_k", f"must be in [1, num_experts = {self.num_experts}], got "
                                   f"{self.moe_top_k}")
        if self.moe_token_drop_policy not in DROP_POLICIES:
            raise bad("moe_token_drop_policy", f"must be one of {', '.join(DROP_POLICIES)}, got "
                                               f"{self.moe_token_drop_policy!r}")
        try:
            check_skips(self.skip_connections, self.num_layers)
        except ModelConfigError as e:
            raise bad("skip_connections:", str(e)) from None

    # ---- (de)serialisation ---------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["skip_connections"] = [s.to_dict() for s in self.skip_connections]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        d = dict(d)
        fields = dataclasses.fields(cls)
        unknown = set(d) - {f.name for f in fields}
        if unknown:
            raise ModelConfigError(f"unknown model config fields: {sorted(unknown)}")
        missing = [f.name for f in fields if f.default is dataclasses.MISSING and f.name not in d]
        if missing:
            raise ModelConfigError(f"model config is missing fields {missing}")
        skips = d.get("skip_connections", ())
        if not isinstance(skips, (list, tuple)):
            raise ModelConfigError(f"model config skip_connections must be a list, got {skips!r}")
        try:
            d["skip_connections"] = tuple(SkipConnection.from_dict(s) for s in skips)
        except ModelConfigError as e:
            raise ModelConfigError(f"model config skip_connections: {e}") from None
        return cls(**d)

    def save(self, path: str) -> None:
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)
            f.write("\n")
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str) -> "ModelConfig":
        with open(path) as f:
            return cls.from_dict(json.load(f))

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    # ---- Megatron-Core -------------------------------------------------------------------------
    def check_layout(self, tp: int = 1, pp: int = 1, ep: int = 1,
                     first_stage_layers: Optional[int] = None,
                     last_stage_layers: Optional[int] = None) -> None:
        """``ValueError`` (one line) when this architecture cannot be split over TP/PP/EP; cheap
        (no Megatron-Core import), so tools can check a layout before any work."""
        if self.num_attention_heads % tp or self.num_query_groups % tp:
            raise ValueError(
                f"tensor parallel size {tp} must divide the attention heads "
                f"({self.num_attention_heads}) and the key/value heads ({self.num_query_groups})"
            )
        pipeline_stage_layers(self.num_layers, pp, first_stage_layers, last_stage_layers)
        if self.is_moe and self.num_experts % ep:
            raise ValueError(f"expert parallel size {ep} must divide num_experts {self.num_experts}")
        if self.padded_vocab_size % tp:
            raise ValueError(f"tensor parallel size {tp} must divide the padded vocabulary "
                             f"{self.padded_vocab_size}")

    def transformer_config(
        self,
        tp: int = 1,
        pp: int = 1,
        ep: int = 1,
        params_dtype: torch.dtype = torch.float32,
        sequence_parallel: bool = False,
        first_stage_layers: Optional[int] = None,
        last_stage_layers: Optional[int] = None,
        **overrides,
    ):
        """The Megatron-Core ``TransformerConfig`` for this architecture on a TP/PP/EP layout
        (checked by :meth:`check_layout` first).

        ``first_stage_layers`` / ``last_stage_layers`` give an uneven pipeline split (Megatron's
        ``num_layers_in_first/last_pipeline_stage``); the other stages share the rest evenly."""
        from megatron.core.transformer.transformer_config import TransformerConfig

        self.check_layout(tp, pp, ep, first_stage_layers, last_stage_layers)
        on_gpu = torch.cuda.is_available()
        kwargs = dict(
            num_layers=self.num_layers,
            hidden_size=self.hidden_size,
            num_attention_heads=self.num_attention_heads,
            num_query_groups=self.num_query_groups,
            ffn_hidden_size=self.ffn_hidden_size,
            kv_channels=self.head_dim,
            normalization="RMSNorm",
            layernorm_epsilon=self.norm_epsilon,
            gated_linear_unit=True,
            activation_func=torch.nn.functional.silu,
            add_bias_linear=False,
            add_qkv_bias=False,
            hidden_dropout=0.0,
            attention_dropout=0.0,
            init_method_std=self.init_method_std,
            tensor_model_parallel_size=tp,
            pipeline_model_parallel_size=pp,
            num_layers_in_first_pipeline_stage=first_stage_layers,
            num_layers_in_last_pipeline_stage=last_stage_layers,
            expert_model_parallel_size=ep,
            sequence_parallel=sequence_parallel and tp > 1,  # no effect at TP=1 (Megatron-LM)
            params_dtype=params_dtype,
            pipeline_dtype=params_dtype,
            bf16=params_dtype == torch.bfloat16,
            fp16=params_dtype == torch.float16,
            use_cpu_initialization=not on_gpu,
            # Fused kernels are CUDA-only; Megatron-Core falls back to plain torch without them.
            bias_activation_fusion=on_gpu,
            bias_dropout_fusion=on_gpu,
            masked_softmax_fusion=on_gpu,
            apply_rope_fusion=False,
            persist_layer_norm=False,
            gradient_accumulation_fusion=False,
        )
        if self.is_moe:
            kwargs.update(
                num_moe_experts=self.num_experts,
                moe_router_topk=self.moe_top_k,
                moe_ffn_hidden_size=self.expert_ffn_hidden_size,
                moe_aux_loss_coeff=self.moe_aux_loss_coeff,
                moe_z_loss_coeff=self.moe_z_loss_coeff,
                moe_expert_capacity_factor=self.moe_capacity_factor,
                moe_router_dtype="fp32",
                # Megatron's name for "softmax over all experts, top-k weights not renormalised".
                moe_router_pre_softmax=not self.moe_normalize_topk,
            )
        kwargs.update(overrides)
        return TransformerConfig(**kwargs)
