"""Hugging Face Phi-3 <-> Megatron-Core: configuration and tensor layout maps.

The tensor map is a table (:func:`tensor_map`): each :class:`TensorMapping` ties one Megatron-Core
checkpoint key to the Hugging Face tensor(s) it is made of, with the two layout transforms. The
converter (:mod:`megatron_jai.checkpoint.convert`) only walks this table, so new tensor kinds
(e.g. Mixtral-style experts for MoE configs) are new rows, added in :func:`moe_mlp_tensor_map`.

Phi-3 layout traps handled here:

* ``qkv_proj`` stacks all query rows, then all key rows, then all value rows. Megatron's fused
  ``linear_qkv`` groups rows per query group: ``[q heads of group 0, k_0, v_0, q heads of group 1,
  k_1, v_1, ...]``. A plain copy is only right when every head is its own group; with grouped-query
  attention (Phi-3-medium: 40 query heads, 10 KV heads) it silently scrambles attention.
* ``gate_up_proj`` is ``[gate; up]``, the same order as Megatron's ``linear_fc1``: a plain copy.
* The embedding and output tables are padded with zero rows to ``padded_vocab_size`` (a multiple of
  128, so any TP that divides it can load them) on import and cut back on export.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from megatron_jai.cli import UserError
from megatron_jai.config import ModelConfig

MODEL_TYPE = "phi3"
JAI_MODEL_TYPE = "jai"  # the layout of megatron_jai.checkpoint.hf_jai
HF_LAYOUTS = ("phi3", "mixtral", "jai")


class ConversionError(UserError):
    """Input that cannot be converted (reported to the user as one line)."""


# ---- configuration -----------------------------------------------------------------------------
def _rope_theta(hf: dict) -> float:
    params = hf.get("rope_parameters") or {}
    if "rope_theta" in params:  # transformers >= 5 writes rope_parameters
        return float(params["rope_theta"])
    return float(hf.get("rope_theta", 10000.0))


def model_config_from_hf(hf: dict, name: str = "phi3") -> ModelConfig:
    """The :class:`ModelConfig` of an HF Phi-3 ``config.json`` (as a dict); rejects what Megatron
    would compute differently."""
    model_type = hf.get("model_type")
    if model_type == MIXTRAL_MODEL_TYPE:  # MoE checkpoints: see the Mixtral section below
        return model_config_from_mixtral(hf, name)
    if model_type == JAI_MODEL_TYPE:  # skips, experts, ... (megatron_jai.checkpoint.hf_jai)
        from megatron_jai.checkpoint.hf_jai import model_config_from_jai

        return model_config_from_jai(hf, name)
    if model_type != MODEL_TYPE:
        raise ConversionError(f"config.json has model_type {model_type!r}; only {MODEL_TYPE!r} "
                              f"(Phi-3), {MIXTRAL_MODEL_TYPE!r} (MoE) and {JAI_MODEL_TYPE!r} "
                              f"(exported by this toolkit) checkpoints are supported")
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
        rotary_base=_rope_theta(hf),
        norm_epsilon=float(hf.get("rms_norm_eps", 1e-5)),
        kv_channels=None if head_dim * heads == hidden else head_dim,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        init_method_std=float(hf.get("initializer_range", 0.02)),
    )


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


def hf_layout(cfg: ModelConfig, requested: str = "auto") -> str:
    """The Hugging Face architecture an export of ``cfg`` uses: plain Phi-3 for a dense model and
    Mixtral for an MoE model with Mixtral's router, when they express the model exactly; the JAI
    layout (our own modeling code) for everything else -- DUS skips, RoPE position interpolation,
    an expert bias or un-renormalised top-k weights -- or when ``requested == "jai"``."""
    if requested not in ("auto", JAI_MODEL_TYPE):
        raise ConversionError(f"unknown export format {requested!r}; choose 'auto' or 'jai'")
    plain = not (cfg.skip_connections or cfg.rotary_interpolation_factor)
    if cfg.is_moe:
        plain = plain and cfg.moe_normalize_topk and not cfg.moe_expert_bias
    if requested == JAI_MODEL_TYPE or not plain:
        return JAI_MODEL_TYPE
    return MIXTRAL_MODEL_TYPE if cfg.is_moe else MODEL_TYPE


def hf_config_for_layout(cfg: ModelConfig, layout: str, base: Optional[dict] = None) -> dict:
    """The ``config.json`` dict of ``cfg`` in ``layout`` (see :func:`hf_layout`)."""
    if layout == JAI_MODEL_TYPE:
        from megatron_jai.checkpoint.hf_jai import jai_hf_config_from_model_config

        return jai_hf_config_from_model_config(cfg, base)
    return hf_config_from_model_config(cfg, base)


def hf_config_from_model_config(cfg: ModelConfig, base: Optional[dict] = None) -> dict:
    """An HF Phi-3 config dict for ``cfg``. With ``base`` (the original config.json), every field is
    kept and only the architecture fields whose value changed (e.g. after up-scaling) are set."""
    if cfg.skip_connections:
        raise ConversionError("the checkpoint has DUS skip connections, which Hugging Face Phi-3 "
                              "cannot express")
    if cfg.rotary_interpolation_factor:
        raise ConversionError("RoPE position interpolation cannot be expressed in a Phi-3 config")
    if cfg.is_moe:  # MoE models export in the Mixtral layout (section below)
        return mixtral_hf_config_from_model_config(cfg, base)
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
    _set_architecture_fields(hf, cfg, want, {"partial_rotary_factor": 1.0, "rope_type": "default"})
    return hf


def _set_architecture_fields(hf: dict, cfg: ModelConfig, want: dict, rope_defaults: dict) -> None:
    """Set ``want``, head_dim and the RoPE base in the HF config dict ``hf``, touching only the
    values that differ, so an unchanged model's config.json round-trips byte for byte."""
    for key, value in want.items():
        if hf.get(key) != value:
            hf[key] = value
    if cfg.head_dim * cfg.num_attention_heads != cfg.hidden_size or hf.get("head_dim"):
        if hf.get("head_dim") != cfg.head_dim:
            hf["head_dim"] = cfg.head_dim
    has_theta = "rope_theta" in hf or "rope_theta" in (hf.get("rope_parameters") or {})
    if not has_theta or _rope_theta(hf) != cfg.rotary_base:
        if "rope_theta" in hf and "rope_parameters" not in hf:  # transformers 4 style
            hf["rope_theta"] = cfg.rotary_base
        else:
            params = dict(hf.get("rope_parameters") or rope_defaults)
            params["rope_theta"] = cfg.rotary_base
            hf["rope_parameters"] = params


# ---- tensor layouts ----------------------------------------------------------------------------
def qkv_hf_to_mcore(cfg: ModelConfig, qkv: torch.Tensor) -> torch.Tensor:
    """``[Q; K; V]`` rows (HF) -> per-query-group ``[q_g, k_g, v_g]`` blocks (Megatron)."""
    d, nq, ng = cfg.head_dim, cfg.num_attention_heads, cfg.num_query_groups
    h = qkv.shape[-1]
    _check_rows("qkv_proj", qkv, (nq + 2 * ng) * d)
    q, k, v = torch.split(qkv, [nq * d, ng * d, ng * d])
    grouped = torch.cat([q.reshape(ng, nq // ng * d, h), k.reshape(ng, d, h), v.reshape(ng, d, h)], 1)
    return grouped.reshape(-1, h)


def qkv_mcore_to_hf(cfg: ModelConfig, qkv: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`qkv_hf_to_mcore`."""
    d, nq, ng = cfg.head_dim, cfg.num_attention_heads, cfg.num_query_groups
    h = qkv.shape[-1]
    _check_rows("linear_qkv", qkv, (nq + 2 * ng) * d)
    q, k, v = torch.split(qkv.reshape(ng, (nq // ng + 2) * d, h), [nq // ng * d, d, d], 1)
    return torch.cat([q.reshape(-1, h), k.reshape(-1, h), v.reshape(-1, h)])


def pad_vocab(cfg: ModelConfig, table: torch.Tensor) -> torch.Tensor:
    """``[vocab, H]`` -> ``[padded_vocab, H]`` with zero rows (never produce those tokens' logits
    from noise: zero output rows give logit 0, and padded ids never occur in data)."""
    _check_rows("vocabulary table", table, cfg.vocab_size)
    pad = cfg.padded_vocab_size - cfg.vocab_size
    return torch.cat([table, table.new_zeros(pad, table.shape[1])]) if pad else table


def unpad_vocab(cfg: ModelConfig, table: torch.Tensor) -> torch.Tensor:
    _check_rows("vocabulary table", table, cfg.padded_vocab_size)
    return table[: cfg.vocab_size]


def _check_rows(what: str, t: torch.Tensor, rows: int) -> None:
    if t.shape[0] != rows:
        raise ConversionError(f"{what} has {t.shape[0]} rows, the config implies {rows}")


def _same(cfg: ModelConfig, t: torch.Tensor) -> torch.Tensor:
    return t


@dataclass(frozen=True)
class TensorMapping:
    """One Megatron-Core checkpoint tensor and the HF tensors it is made of.

    ``mcore``: the checkpoint key (``decoder.layers.*`` keys are stacked over layers).
    ``hf``: HF names; in per-layer rows ``{layer}`` stands for the layer index.
    ``to_mcore(cfg, *hf_tensors)`` -> the Megatron tensor (one layer of it when stacked);
    ``to_hf(cfg, tensor)`` -> the HF tensor, or a tuple when ``hf`` has several names.
    """

    mcore: str
    hf: tuple
    to_mcore: Callable = _same
    to_hf: Callable = _same
    per_layer: bool = field(default=False)

    def hf_names(self, layer: Optional[int] = None) -> list[str]:
        return [n.format(layer=layer) for n in self.hf]


def _layer(mcore: str, hf: str, to_mcore=_same, to_hf=_same) -> TensorMapping:
    return TensorMapping(f"decoder.layers.{mcore}", (f"model.layers.{{layer}}.{hf}",),
                         to_mcore, to_hf, per_layer=True)


def attention_tensor_map(cfg: ModelConfig) -> list[TensorMapping]:
    return [
        _layer("self_attention.linear_qkv.layer_norm_weight", "input_layernorm.weight"),
        _layer("self_attention.linear_qkv.weight", "self_attn.qkv_proj.weight",
               qkv_hf_to_mcore, qkv_mcore_to_hf),
        _layer("self_attention.linear_proj.weight", "self_attn.o_proj.weight"),
    ]


def dense_mlp_tensor_map(cfg: ModelConfig) -> list[TensorMapping]:
    return [
        # The pre-MLP RMSNorm is fused into linear_fc1 in the dense layer's checkpoint keys.
        _layer("mlp.linear_fc1.layer_norm_weight", "post_attention_layernorm.weight"),
        _layer("mlp.linear_fc1.weight", "mlp.gate_up_proj.weight"),  # [gate; up] on both sides
        _layer("mlp.linear_fc2.weight", "mlp.down_proj.weight"),
    ]


def tensor_map(cfg: ModelConfig, layout: Optional[str] = None) -> list[TensorMapping]:
    """Every tensor of a model with this config, in Hugging Face order, in ``layout`` (default:
    Mixtral for MoE configs, else Phi-3)."""
    layout = layout or (MIXTRAL_MODEL_TYPE if cfg.is_moe else MODEL_TYPE)
    if layout not in HF_LAYOUTS:
        raise ConversionError(f"unknown Hugging Face layout {layout!r}")
    rows = [TensorMapping("embedding.word_embeddings.weight", ("model.embed_tokens.weight",),
                          pad_vocab, unpad_vocab)]
    if layout == JAI_MODEL_TYPE:
        from megatron_jai.checkpoint.hf_jai import jai_tensor_map

        rows += jai_tensor_map(cfg)
    elif layout == MIXTRAL_MODEL_TYPE:
        rows += mixtral_attention_tensor_map(cfg) + moe_mlp_tensor_map(cfg)
    else:
        rows += attention_tensor_map(cfg) + dense_mlp_tensor_map(cfg)
    rows.append(TensorMapping("decoder.final_layernorm.weight", ("model.norm.weight",)))
    if not cfg.tie_embeddings:
        rows.append(TensorMapping("output_layer.weight", ("lm_head.weight",), pad_vocab, unpad_vocab))
    return rows


def hf_name_index(cfg: ModelConfig, rows: list[TensorMapping]) -> dict:
    """HF tensor name -> ``(row, layer or None, position in row.hf)`` for every expected tensor."""
    index = {}
    for row in rows:
        layers = range(cfg.num_layers) if row.per_layer else [None]
        for layer in layers:
            for pos, name in enumerate(row.hf_names(layer)):
                index[name] = (row, layer, pos)
    return index


# ---- Mixtral layout for MoE configs (MOE engineer's section) -------------------------------------
# An MoE ModelConfig converts to and from Hugging Face ``MixtralForCausalLM``: the same decoder as
# Phi-3 (RMSNorm, RoPE, GQA, SwiGLU, no biases) with separate q/k/v projections and, per layer,
# ``block_sparse_moe.gate`` (the router, [E, H]) and experts ``block_sparse_moe.experts.{e}.w1 / w3 /
# w2`` = gate / up / down. Mixtral routes with softmax, top-k and renormalised top-k weights, which
# is our router with ``moe_normalize_topk=True`` and no expert bias. Megatron keys:
# ``decoder.layers.mlp.router.weight`` [L, E, H], ``decoder.layers.mlp.experts.weight_gate_up``
# [L, E, 2F, H] (rows [w1; w3] per expert), ``decoder.layers.mlp.experts.weight_down`` [L, E, H, F]
# and the unfused ``decoder.layers.pre_mlp_layernorm.weight`` (see megatron_jai.moe.layer).
MIXTRAL_MODEL_TYPE = "mixtral"

_MIXTRAL_TEMPLATE = {
    "architectures": ["MixtralForCausalLM"],
    "model_type": MIXTRAL_MODEL_TYPE,
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
_TOKEN_ID_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id")


def model_config_from_mixtral(hf: dict, name: str = "mixtral") -> ModelConfig:
    """The MoE :class:`ModelConfig` of an HF Mixtral ``config.json``."""
    if hf.get("sliding_window"):
        raise ConversionError(f"Mixtral sliding-window attention (sliding_window="
                              f"{hf['sliding_window']}) is not supported")
    if float(hf.get("router_jitter_noise") or 0.0) != 0.0:
        raise ConversionError("Mixtral router_jitter_noise > 0 is not supported (our router has no "
                              "jitter)")
    # The decoder fields are Phi-3's (same names and checks); the experts come on top.
    dense = model_config_from_hf({**hf, "model_type": MODEL_TYPE}, name=name)
    experts, top_k = int(hf.get("num_local_experts", 8)), int(hf.get("num_experts_per_tok", 2))
    return dense.replace(num_experts=experts, moe_top_k=top_k, moe_normalize_topk=True,
                         moe_aux_loss_coeff=float(hf.get("router_aux_loss_coef",
                                                         dense.moe_aux_loss_coeff)))


def mixtral_hf_config_from_model_config(cfg: ModelConfig, base: Optional[dict] = None) -> dict:
    """An HF Mixtral config dict for an MoE ``cfg``. With a Mixtral ``base`` (the original
    config.json) every field is kept and only changed architecture fields are set; any other base
    (e.g. the Phi-3 config of an upcycled model) only lends its token ids."""
    if cfg.moe_expert_bias:
        raise ConversionError("the router has an aux-loss-free expert bias, which Mixtral cannot "
                              "express")
    if not cfg.moe_normalize_topk:
        raise ConversionError("Mixtral renormalises the top-k routing weights; this config does not "
                              "(moe_normalize_topk = false)")
    if base is not None and base.get("model_type") == MIXTRAL_MODEL_TYPE:
        hf = dict(base)
    else:
        hf = dict(_MIXTRAL_TEMPLATE)
        hf.update({k: base[k] for k in _TOKEN_ID_FIELDS if base and k in base})
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
    _set_architecture_fields(hf, cfg, want, {"rope_type": "default"})
    return hf


def _qkv_from_q_k_v(cfg: ModelConfig, q, k, v) -> torch.Tensor:
    return qkv_hf_to_mcore(cfg, torch.cat([q, k, v]))


def _q_k_v_from_qkv(cfg: ModelConfig, qkv: torch.Tensor) -> tuple:
    d, nq, ng = cfg.head_dim, cfg.num_attention_heads, cfg.num_query_groups
    return tuple(t.contiguous() for t in torch.split(qkv_mcore_to_hf(cfg, qkv), [nq * d, ng * d, ng * d]))


def mixtral_attention_tensor_map(cfg: ModelConfig) -> list[TensorMapping]:
    names = tuple(f"model.layers.{{layer}}.self_attn.{p}_proj.weight" for p in "qkv")
    return [
        _layer("self_attention.linear_qkv.layer_norm_weight", "input_layernorm.weight"),
        TensorMapping("decoder.layers.self_attention.linear_qkv.weight", names,
                      _qkv_from_q_k_v, _q_k_v_from_qkv, per_layer=True),
        _layer("self_attention.linear_proj.weight", "self_attn.o_proj.weight"),
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


def moe_mlp_tensor_map(cfg: ModelConfig) -> list[TensorMapping]:
    """Rows of an MoE layer in the Mixtral layout."""
    moe = "model.layers.{layer}.block_sparse_moe"
    gate_up = tuple(f"{moe}.experts.{e}.{w}.weight" for e in range(cfg.num_experts) for w in ("w1", "w3"))
    down = tuple(f"{moe}.experts.{e}.w2.weight" for e in range(cfg.num_experts))
    return [
        _layer("pre_mlp_layernorm.weight", "post_attention_layernorm.weight"),
        _layer("mlp.router.weight", "block_sparse_moe.gate.weight"),
        TensorMapping("decoder.layers.mlp.experts.weight_gate_up", gate_up,
                      _experts_gate_up_to_mcore, _experts_gate_up_to_hf, per_layer=True),
        TensorMapping("decoder.layers.mlp.experts.weight_down", down,
                      _experts_down_to_mcore, _experts_down_to_hf, per_layer=True),
    ]
