"""The JAI Hugging Face format (``model_type: "jai"``): every model this toolkit makes.

The layout is what :mod:`megatron_jai.hf.modeling_jai` loads: Llama / Mixtral tensor names on
Phi-3's decoder, i.e. separate ``q_proj / k_proj / v_proj``, a dense MLP as ``mlp.gate_proj /
up_proj / down_proj``, or experts as Mixtral's ``block_sparse_moe.gate`` and
``block_sparse_moe.experts.{e}.w1 / w3 / w2`` (+ ``block_sparse_moe.gate.expert_bias`` for
aux-loss-free balancing). It expresses DUS skips with or without experts, any router options,
RoPE position interpolation (``rope_type: "linear"``).
"""
from __future__ import annotations

from typing import Optional

import torch

from megatron_jai.checkpoint.formats import mixtral, phi3
from megatron_jai.checkpoint.formats.common import (TOKEN_ID_FIELDS, ConversionError,
                                                    TensorMapping, layer_row)
from megatron_jai.config import ModelConfig, ModelConfigError, SkipConnection

MODEL_TYPE = "jai"
AUTO_MAP = {
    "AutoConfig": "configuration_jai.JaiConfig",
    "AutoModel": "modeling_jai.JaiModel",
    "AutoModelForCausalLM": "modeling_jai.JaiForCausalLM",
}
# Training settings the HF model does not use, kept so that hf-to-mcore restores the ModelConfig.
_TRAINING_FIELDS = {
    "router_aux_loss_coef": "moe_aux_loss_coeff",
    "router_z_loss_coef": "moe_z_loss_coeff",
    "expert_capacity_factor": "moe_capacity_factor",
    "expert_drop_policy": "moe_token_drop_policy",
    "router_expert_bias_update_rate": "moe_expert_bias_update_rate",
    "make_vocab_size_divisible_by": "make_vocab_size_divisible_by",
}


def rope_parameters(cfg: ModelConfig) -> dict:
    if cfg.rotary_interpolation_factor:
        return {"rope_type": "linear", "rope_theta": cfg.rotary_base,
                "factor": float(cfg.rotary_interpolation_factor)}
    return {"rope_type": "default", "rope_theta": cfg.rotary_base}


# ---- configuration -----------------------------------------------------------------------------
def unsupported(cfg: ModelConfig) -> Optional[str]:
    """Nothing: the JAI format expresses every model of this toolkit."""
    return None


def hf_config(cfg: ModelConfig, base: Optional[dict] = None) -> dict:
    """The JAI ``config.json`` dict of ``cfg``. A JAI ``base`` (the original config.json) keeps
    its other fields; any other base (e.g. the Phi-3 config of an up-scaled model) only lends its
    token ids."""
    if base is not None and base.get("model_type") == MODEL_TYPE:
        hf = dict(base)
    else:
        hf = {"hidden_act": "silu", "attention_dropout": 0.0, "use_cache": True, "dtype": "float32"}
        hf.update({k: (base or {}).get(k) for k in TOKEN_ID_FIELDS})
    want = {
        "architectures": ["JaiForCausalLM"],
        "model_type": MODEL_TYPE,
        "auto_map": AUTO_MAP,
        "num_hidden_layers": cfg.num_layers,
        "hidden_size": cfg.hidden_size,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_query_groups,
        "head_dim": cfg.head_dim,
        "intermediate_size": cfg.expert_ffn_hidden_size if cfg.is_moe else cfg.ffn_hidden_size,
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.norm_epsilon,
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_method_std,
        "rope_parameters": rope_parameters(cfg),
        # The same for readers of the older keys (transformers 4, vLLM's own RoPE helpers).
        "rope_theta": cfg.rotary_base,
        "rope_scaling": ({"type": "linear", "rope_type": "linear",
                          "factor": float(cfg.rotary_interpolation_factor)}
                         if cfg.rotary_interpolation_factor else None),
        "skip_connections": [s.to_dict() for s in cfg.skip_connections],
        "num_local_experts": cfg.num_experts,
        "num_experts_per_tok": cfg.moe_top_k,
        "norm_topk_prob": cfg.moe_normalize_topk,
        "router_expert_bias": cfg.moe_expert_bias,
        **{hf_key: getattr(cfg, field) for hf_key, field in _TRAINING_FIELDS.items()},
    }
    if not cfg.is_moe:  # dense FFN: the expert fields would only mislead
        want.pop("num_experts_per_tok")
    for key, value in want.items():
        if hf.get(key) != value:
            hf[key] = value
    return hf


def model_config(hf: dict, name: str = "jai") -> ModelConfig:
    """The :class:`ModelConfig` of a JAI ``config.json`` (as a dict)."""
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "linear"):
        raise ConversionError(f"RoPE type {rope_type!r} is not supported (default or linear)")
    try:
        skips = tuple(SkipConnection.from_dict(s, alpha_train=None, alpha_infer=None)
                      for s in hf.get("skip_connections") or ())
    except ModelConfigError:
        raise ConversionError("config.json skip_connections must be a list of {source, target, "
                              "alpha_train, alpha_infer}") from None
    # The decoder fields are Phi-3's (same names and checks), with the RoPE scaling taken out.
    theta = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
    decoder = phi3.model_config({**hf, "rope_scaling": None,
                                 "rope_parameters": {"rope_type": "default", "rope_theta": theta}},
                                name=name)
    return decoder.replace(
        rotary_interpolation_factor=float(rope["factor"]) if rope_type == "linear" else None,
        num_experts=int(hf.get("num_local_experts") or 0),
        moe_top_k=int(hf.get("num_experts_per_tok", 2)),
        moe_normalize_topk=bool(hf.get("norm_topk_prob", True)),
        moe_expert_bias=bool(hf.get("router_expert_bias", False)),
        skip_connections=skips,
        **{field: hf[key] for key, field in _TRAINING_FIELDS.items() if key in hf})


# ---- tensor layouts ----------------------------------------------------------------------------
def _split_gate_up(cfg: ModelConfig, t: torch.Tensor) -> tuple:
    gate, up = t.chunk(2)
    return gate.contiguous(), up.contiguous()


def _cat_gate_up(cfg: ModelConfig, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return torch.cat([gate, up])


def decoder_tensor_map(cfg: ModelConfig) -> list[TensorMapping]:
    """The per-layer rows of the JAI layout."""
    rows = mixtral.attention_tensor_map(cfg)
    if cfg.is_moe:
        rows += mixtral.moe_tensor_map(cfg)
        if cfg.moe_expert_bias:
            rows.append(layer_row("mlp.router.expert_bias", "block_sparse_moe.gate.expert_bias"))
        return rows
    mlp = "model.layers.{layer}.mlp"
    return rows + [
        layer_row("mlp.linear_fc1.layer_norm_weight", "post_attention_layernorm.weight"),
        TensorMapping("decoder.layers.mlp.linear_fc1.weight",  # rows [gate; up]
                      (f"{mlp}.gate_proj.weight", f"{mlp}.up_proj.weight"),
                      _cat_gate_up, _split_gate_up, per_layer=True),
        layer_row("mlp.linear_fc2.weight", "mlp.down_proj.weight"),
    ]
