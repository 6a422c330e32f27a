"""The Hugging Face Mixtral format (``model_type: "mixtral"``): MoE models without DUS skips.

The same decoder as Phi-3 (RMSNorm, RoPE, GQA, SwiGLU, no biases) with separate q/k/v projections
and, per layer, ``block_sparse_moe.gate`` (the router, [E, H]) and experts
``block_sparse_moe.experts.{e}.w1 / w3 / w2`` = gate / up / down. Mixtral routes with softmax,
top-k and renormalised top-k weights, which is our router with ``moe_normalize_topk=True`` and no
expert bias. Megatron keys: ``decoder.layers.mlp.router.weight`` [L, E, H],
``decoder.layers.mlp.experts.weight_gate_up`` [L, E, 2F, H] (rows [w1; w3] per expert),
``decoder.layers.mlp.experts.weight_down`` [L, E, H, F] and the unfused
``decoder.layers.pre_mlp_layernorm.weight`` (see megatron_jai.moe.layer).
"""
from __future__ import annotations

from typing import Optional

import torch

from megatron_jai.checkpoint.formats import phi3
from megatron_jai.checkpoint.formats.common import (TOKEN_ID_FIELDS, ConversionError,
                                                    TensorMapping, layer_row,
                                                    set_architecture_fields)
from megatron_jai.config import ModelConfig

MODEL_TYPE = "mixtral"

_HF_TEMPLATE = {
    "architectures": ["MixtralForCausalLM"],
    "model_type": MODEL_TYPE,
    "attention_dropout": 0.0,
    "hidden_act": "silu",
    "output_router_logits": False,
    "router_jitter_noise": 0.0,
    "sliding_window": None,
    "use_cache": True,
    "dtype": "float32",
    "bos_token_id": None,
    "eos_token_id": None,
    "pad_token_id": None,
}


# ---- configuration -----------------------------------------------------------------------------
def model_config(hf: dict, name: str = "mixtral") -> ModelConfig:
    """The MoE :class:`ModelConfig` of an HF Mixtral ``config.json``."""
    if hf.get("sliding_window"):
        raise ConversionError(f"Mixtral sliding-window attention (sliding_window="
                              f"{hf['sliding_window']}) is not supported")
    if float(hf.get("router_jitter_noise") or 0.0) != 0.0:
        raise ConversionError("Mixtral router_jitter_noise > 0 is not supported (our router has no "
                              "jitter)")
    # The decoder fields are Phi-3's (same names and checks); the experts come on top.
    dense = phi3.model_config(hf, name=name)
    experts, top_k = int(hf.get("num_local_experts", 8)), int(hf.get("num_experts_per_tok", 2))
    return dense.replace(num_experts=experts, moe_top_k=top_k, moe_normalize_topk=True,
                         moe_aux_loss_coeff=float(hf.get("router_aux_loss_coef",
                                                         dense.moe_aux_loss_coeff)))


def unsupported(cfg: ModelConfig) -> Optional[str]:
    """Why a Mixtral config.json cannot express ``cfg`` (None: it can)."""
    if not cfg.is_moe:
        return "Mixtral needs experts: a dense model exports in the Phi-3 or JAI format"
    if cfg.moe_expert_bias:
        return "the router has an aux-loss-free expert bias, which Mixtral cannot express"
    if not cfg.moe_normalize_topk:
        return ("Mixtral renormalises the top-k routing weights; this config does not "
                "(moe_normalize_topk = false)")
    return phi3.decoder_unsupported(cfg, "Mixtral")


def hf_config(cfg: ModelConfig, base: Optional[dict] = None) -> dict:
    """An HF Mixtral config dict for an MoE ``cfg``. With a Mixtral ``base`` (the original
    config.json) every field is kept and only changed architecture fields are set; any other base
    (e.g. the Phi-3 config of an upcycled model) only lends its token ids."""
    why = unsupported(cfg)
    if why:
        raise ConversionError(why)
    if base is not None and base.get("model_type") == MODEL_TYPE:
        hf = dict(base)
    else:
        hf = dict(_HF_TEMPLATE)
        hf.update({k: base[k] for k in TOKEN_ID_FIELDS if base and k in base})
    want = {
        "num_hidden_layers": cfg.num_layers,
        "hidden_size": cfg.hidden_size,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_query_groups,
        "intermediate_size": cfg.expert_ffn_hidden_size,
        "num_local_experts": cfg.num_experts,
        "num_experts_per_tok": cfg.moe_top_k,
        "router_aux_loss_coef": cfg.moe_aux_loss_coeff,
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.norm_epsilon,
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_method_std,
    }
    set_architecture_fields(hf, cfg, want, {"rope_type": "default"})
    return hf


# ---- tensor layouts ----------------------------------------------------------------------------
def _qkv_from_q_k_v(cfg: ModelConfig, q, k, v) -> torch.Tensor:
    return phi3.qkv_hf_to_mcore(cfg, torch.cat([q, k, v]))


def _q_k_v_from_qkv(cfg: ModelConfig, qkv: torch.Tensor) -> tuple:
    d, nq, ng = cfg.head_dim, cfg.num_attention_heads, cfg.num_query_groups
    return tuple(t.contiguous() for t in
                 torch.split(phi3.qkv_mcore_to_hf(cfg, qkv), [nq * d, ng * d, ng * d]))


def attention_tensor_map(cfg: ModelConfig) -> list[TensorMapping]:
    """Attention rows with separate q/k/v projections (Mixtral, Llama, JAI)."""
    names = tuple(f"model.layers.{{layer}}.self_attn.{p}_proj.weight" for p in "qkv")
    return [
        layer_row("self_attention.linear_qkv.layer_norm_weight", "input_layernorm.weight"),
        TensorMapping("decoder.layers.self_attention.linear_qkv.weight", names,
                      _qkv_from_q_k_v, _q_k_v_from_qkv, per_layer=True),
        layer_row("self_attention.linear_proj.weight", "self_attn.o_proj.weight"),
    ]


def _experts_gate_up_to_mcore(cfg: ModelConfig, *w1_w3) -> torch.Tensor:
    """``w1_0, w3_0, w1_1, w3_1, ...`` ([F, H] each) -> ``[E, 2F, H]`` with rows [gate; up]."""
    return torch.stack([torch.cat(w1_w3[2 * e: 2 * e + 2]) for e in range(cfg.num_experts)])


def _experts_gate_up_to_hf(cfg: ModelConfig, t: torch.Tensor) -> tuple:
    f = cfg.expert_ffn_hidden_size
    return tuple(t[e, i * f:(i + 1) * f].contiguous() for e in range(cfg.num_experts) for i in (0, 1))


def _experts_down_to_mcore(cfg: ModelConfig, *w2) -> torch.Tensor:
    return torch.stack(w2)


def _experts_down_to_hf(cfg: ModelConfig, t: torch.Tensor) -> tuple:
    return tuple(t[e].contiguous() for e in range(cfg.num_experts))


def moe_tensor_map(cfg: ModelConfig) -> list[TensorMapping]:
    """Rows of an MoE layer in the Mixtral layout."""
    moe = "model.layers.{layer}.block_sparse_moe"
    gate_up = tuple(f"{moe}.experts.{e}.{w}.weight" for e in range(cfg.num_experts) for w in ("w1", "w3"))
    down = tuple(f"{moe}.experts.{e}.w2.weight" for e in range(cfg.num_experts))
    return [
        layer_row("pre_mlp_layernorm.weight", "post_attention_layernorm.weight"),
        layer_row("mlp.router.weight", "block_sparse_moe.gate.weight"),
        TensorMapping("decoder.layers.mlp.experts.weight_gate_up", gate_up,
                      _experts_gate_up_to_mcore, _experts_gate_up_to_hf, per_layer=True),
        TensorMapping("decoder.layers.mlp.experts.weight_down", down,
                      _experts_down_to_mcore, _experts_down_to_hf, per_layer=True),
    ]


def decoder_tensor_map(cfg: ModelConfig) -> list[TensorMapping]:
    """The per-layer rows of the Mixtral layout."""
    return attention_tensor_map(cfg) + moe_tensor_map(cfg)
