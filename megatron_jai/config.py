"""Model configuration: one dataclass, named presets, parameter counts, and the Megatron-Core view.

``ModelConfig`` describes the *architecture* only (what a checkpoint needs to be rebuilt); how it is
split over GPUs (TP/PP/EP) is chosen at run time and passed to :meth:`ModelConfig.transformer_config`.
It is saved as ``model_config.json`` next to every checkpoint.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Optional

import torch

# The skip type and the pipeline split arithmetic live with the DUS plans (the plan module imports
# nothing from here); re-exported because configs carry skips and validate pipeline splits.
from megatron_jai.upscale.plan import SkipConnection, get_plan, pipeline_stage_layers  # noqa: F401


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

    # ---- (de)serialisation ---------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["skip_connections"] = [dataclasses.asdict(s) for s in self.skip_connections]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        d = dict(d)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown model config fields: {sorted(unknown)}")
        d["skip_connections"] = tuple(SkipConnection(**s) for s in d.get("skip_connections", ()))
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


# Phi-3-medium-4k (microsoft/Phi-3-medium-4k-instruct config.json).
PHI3_MEDIUM = ModelConfig(
    name="phi3-medium",
    num_layers=40,
    hidden_size=5120,
    num_attention_heads=40,
    num_query_groups=10,
    ffn_hidden_size=17920,
    vocab_size=32064,
    max_position_embeddings=4096,
    rotary_base=10000.0,
    norm_epsilon=1e-5,
)


JAI_75B = PHI3_MEDIUM.replace(
    name="jai-75b",
    num_layers=64,
    vocab_size=64000,
    num_experts=4,
    moe_top_k=2,
    # Solar-Pro layout on Phi-3-medium: the DUS plan is the one source of truth for the skips
    # (12->16, 20->24, 20->28, 32->36, 32->40, 44->48).
    skip_connections=get_plan("phi3-medium-jai").skip_connections,
)

# Tiny presets for CPU tests and the demo (same shape rules as Phi-3: GQA, SwiGLU, RMSNorm).
TINY = ModelConfig(
    name="tiny",
    num_layers=4,
    hidden_size=64,
    num_attention_heads=4,
    num_query_groups=2,
    ffn_hidden_size=160,
    vocab_size=1024,
    max_position_embeddings=512,
)
TINY_MOE = TINY.replace(name="tiny-moe", num_experts=4, moe_top_k=2, ffn_hidden_size=96)

PRESETS = {c.name: c for c in (PHI3_MEDIUM, JAI_75B, TINY, TINY_MOE)}


def get_preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown model preset {name!r}; choose from {sorted(PRESETS)}") from None


def load_model_config(spec: str) -> ModelConfig:
    """A preset name, a ``model_config.json`` path, or a checkpoint directory holding one."""
    if spec in PRESETS:
        return PRESETS[spec]
    path = os.path.join(spec, "model_config.json") if os.path.isdir(spec) else spec
    if not os.path.isfile(path):
        raise ValueError(f"{spec!r} is neither a preset ({', '.join(sorted(PRESETS))}) "
                         f"nor a model_config.json")
    return ModelConfig.load(path)
