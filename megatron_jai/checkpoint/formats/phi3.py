"""The Hugging Face Phi-3 format (``model_type: "phi3"``): dense models without DUS skips.

Phi-3 layout traps handled here:

* ``qkv_proj`` stacks all query rows, then all key rows, then all value rows. Megatron's fused
  ``linear_qkv`` groups rows per query group: ``[q heads of group 0, k_0, v_0, q heads of group 1,
  k_1, v_1, ...]``. A plain copy is only right when every head is its own group; with grouped-query
  attention (Phi-3-medium: 40 query heads, 10 KV heads) it silently scrambles attention.
* ``gate_up_proj`` is ``[gate; up]``, the same order as Megatron's ``linear_fc1``: a plain copy.
* The embedding and output tables are padded with zero rows to ``padded_vocab_size`` (a multiple of
  128, so any TP that divides it can load them) on import and cut back on export
  (:mod:`megatron_jai.checkpoint.formats.common`).

The decoder fields of config.json (and their checks) are shared by the Mixtral and JAI formats.
"""
from __future__ import annotations

from typing import Optional

import torch

from megatron_jai.checkpoint.formats.common import (ConversionError, TensorMapping, check_rows,
                                                    layer_row, rope_theta,
                                                    set_architecture_fields)
from megatron_jai.config import ModelConfig

MODEL_TYPE = "phi3"

# A Phi-3 config.json for a ModelConfig with no original to start from (transformers 5 style).
_HF_TEMPLATE = {
    "architectures": ["Phi3ForCausalLM"],
    "model_type": MODEL_TYPE,
    "attention_dropout": 0.0,
    "embd_pdrop": 0.0,
    "resid_pdrop": 0.0,
    "hidden_act": "silu",
    "use_cache": True,
    "sliding_window": None,
    "dtype": "float32",
    # Phi3Config's defaults (32000 etc.) belong to the Phi-3 tokenizer; a checkpoint without its
    # original config.json may have another vocabulary, so the ids are left unset.
    "bos_token_id": None,
    "eos_token_id": None,
    "pad_token_id": None,
}


# ---- configuration -----------------------------------------------------------------------------
def model_config(hf: dict, name: str = "phi3") -> ModelConfig:
    """The :class:`ModelConfig` of an HF Phi-3 ``config.json`` (as a dict); rejects what Megatron
    would compute differently."""
    rope_params = hf.get("rope_parameters") or {}
    if hf.get("rope_scaling") or rope_params.get("rope_type", "default") != "default":
        kind = (hf.get("rope_scaling") or {}).get("type") or rope_params.get("rope_type")
        raise ConversionError(f"RoPE scaling {kind!r} (e.g. Phi-3 128k longrope) is not supported; "
                              f"convert a 4k-context Phi-3 checkpoint")
    if float(rope_params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))) != 1.0:
        raise ConversionError("partial rotary embeddings are not supported")
    if hf.get("hidden_act", "silu") != "silu":
        raise ConversionError(f"hidden_act {hf['hidden_act']!r} is not supported (Phi-3 uses silu)")
    heads = int(hf["num_attention_heads"])
    hidden = int(hf["hidden_size"])
    head_dim = int(hf.get("head_dim") or hidden // heads)
    return ModelConfig(
        name=name,
        num_layers=int(hf["num_hidden_layers"]),
        hidden_size=hidden,
        num_attention_heads=heads,
        num_query_groups=int(hf.get("num_key_value_heads") or heads),
        ffn_hidden_size=int(hf["intermediate_size"]),
        vocab_size=int(hf["vocab_size"]),
        max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
        rotary_base=rope_theta(hf),
        norm_epsilon=float(hf.get("rms_norm_eps", 1e-5)),
        kv_channels=None if head_dim * heads == hidden else head_dim,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        init_method_std=float(hf.get("initializer_range", 0.02)),
    )


def decoder_unsupported(cfg: ModelConfig, arch: str) -> Optional[str]:
    """What of ``cfg``'s decoder the plain Hugging Face decoder of ``arch`` cannot express."""
    if cfg.skip_connections:
        return f"the checkpoint has DUS skip connections, which Hugging Face {arch} cannot express"
    if cfg.rotary_interpolation_factor:
        return f"RoPE position interpolation cannot be expressed in a {arch} config"
    return None


def unsupported(cfg: ModelConfig) -> Optional[str]:
    """Why a Phi-3 config.json cannot express ``cfg`` (None: it can)."""
    if cfg.is_moe:
        return "Phi-3 has no experts: an MoE model exports in the Mixtral or JAI format"
    return decoder_unsupported(cfg, "Phi-3")


def hf_config(cfg: ModelConfig, base: Optional[dict] = None) -> dict:
    """An HF Phi-3 config dict for ``cfg``. With ``base`` (the original config.json), every field is
    kept and only the architecture fields whose value changed (e.g. after up-scaling) are set."""
    why = unsupported(cfg)
    if why:
        raise ConversionError(why)
    hf = dict(base) if base is not None else dict(_HF_TEMPLATE)
    want = {
        "num_hidden_layers": cfg.num_layers,
        "hidden_size": cfg.hidden_size,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_query_groups,
        "intermediate_size": cfg.ffn_hidden_size,
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.norm_epsilon,
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_method_std,
    }
    set_architecture_fields(hf, cfg, want, {"partial_rotary_factor": 1.0, "rope_type": "default"})
    return hf


# ---- tensor layouts ----------------------------------------------------------------------------
def qkv_hf_to_mcore(cfg: ModelConfig, qkv: torch.Tensor) -> torch.Tensor:
    """``[Q; K; V]`` rows (HF) -> per-query-group ``[q_g, k_g, v_g]`` blocks (Megatron)."""
    d, nq, ng = cfg.head_dim, cfg.num_attention_heads, cfg.num_query_groups
    h = qkv.shape[-1]
    check_rows("qkv_proj", qkv, (nq + 2 * ng) * d)
    q, k, v = torch.split(qkv, [nq * d, ng * d, ng * d])
    grouped = torch.cat([q.reshape(ng, nq // ng * d, h), k.reshape(ng, d, h), v.reshape(ng, d, h)], 1)
    return grouped.reshape(-1, h)


def qkv_mcore_to_hf(cfg: ModelConfig, qkv: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`qkv_hf_to_mcore`."""
    d, nq, ng = cfg.head_dim, cfg.num_attention_heads, cfg.num_query_groups
    h = qkv.shape[-1]
    check_rows("linear_qkv", qkv, (nq + 2 * ng) * d)
    q, k, v = torch.split(qkv.reshape(ng, (nq // ng + 2) * d, h), [nq // ng * d, d, d], 1)
    return torch.cat([q.reshape(-1, h), k.reshape(-1, h), v.reshape(-1, h)])


def decoder_tensor_map(cfg: ModelConfig) -> list[TensorMapping]:
    """The per-layer rows of the Phi-3 layout."""
    return [
        layer_row("self_attention.linear_qkv.layer_norm_weight", "input_layernorm.weight"),
        layer_row("self_attention.linear_qkv.weight", "self_attn.qkv_proj.weight",
                  qkv_hf_to_mcore, qkv_mcore_to_hf),
        layer_row("self_attention.linear_proj.weight", "self_attn.o_proj.weight"),
        # The pre-MLP RMSNorm is fused into linear_fc1 in the dense layer's checkpoint keys.
        layer_row("mlp.linear_fc1.layer_norm_weight", "post_attention_layernorm.weight"),
        layer_row("mlp.linear_fc1.weight", "mlp.gate_up_proj.weight"),  # [gate; up] on both sides
        layer_row("mlp.linear_fc2.weight", "mlp.down_proj.weight"),
    ]
