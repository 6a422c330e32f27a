"""The Hugging Face formats a model converts to and from, and the one dispatcher among them.

Each format is one module with the same faces: ``MODEL_TYPE`` (its ``config.json`` model_type),
``model_config(hf, name)`` (config.json -> :class:`~megatron_jai.config.ModelConfig`),
``hf_config(cfg, base)`` (the way back; ``base`` is the original config.json, kept where it still
holds), ``unsupported(cfg)`` (why the format cannot express a model, or None) and
``decoder_tensor_map(cfg)`` (the per-layer rows of the tensor map):

* :mod:`~megatron_jai.checkpoint.formats.phi3`: dense models without skips;
* :mod:`~megatron_jai.checkpoint.formats.mixtral`: MoE models without skips, Mixtral's router;
* :mod:`~megatron_jai.checkpoint.formats.jai`: everything (skips, RoPE interpolation, any router),
  loaded with the modeling code of :mod:`megatron_jai.hf`.

The tensor map is a table (:func:`tensor_map`): each
:class:`~megatron_jai.checkpoint.formats.common.TensorMapping` ties one Megatron-Core checkpoint key
to the Hugging Face tensor(s) it is made of, with the two layout transforms. The converter
(:mod:`megatron_jai.checkpoint.convert`, :mod:`megatron_jai.hf.export`) only walks this table, so a
new tensor kind is a new row and a new format a new module here.
"""
from __future__ import annotations

from typing import Optional

from megatron_jai.checkpoint.formats import jai, mixtral, phi3
from megatron_jai.checkpoint.formats.common import (ConversionError, TensorMapping, pad_vocab,
                                                    unpad_vocab)
from megatron_jai.config import ModelConfig

FORMATS = {f.MODEL_TYPE: f for f in (phi3, mixtral, jai)}


def model_config_from_hf(hf: dict, name: str = "phi3") -> ModelConfig:
    """The :class:`ModelConfig` of an HF ``config.json`` (as a dict) of any known format; rejects
    what Megatron would compute differently."""
    model_type = hf.get("model_type")
    if model_type not in FORMATS:
        raise ConversionError(f"config.json has model_type {model_type!r}; only "
                              f"{phi3.MODEL_TYPE!r} (Phi-3), {mixtral.MODEL_TYPE!r} (MoE) and "
                              f"{jai.MODEL_TYPE!r} (exported by this toolkit) checkpoints are "
                              f"supported")
    return FORMATS[model_type].model_config(hf, name)


def hf_layout(cfg: ModelConfig, requested: str = "auto") -> str:
    """The Hugging Face format an export of ``cfg`` uses: plain Phi-3 for a dense model and Mixtral
    for an MoE model with Mixtral's router, when they express the model exactly; the JAI format
    (our own modeling code) for everything else -- DUS skips, RoPE position interpolation, an
    expert bias or un-renormalised top-k weights -- or when ``requested == "jai"``."""
    if requested not in ("auto", jai.MODEL_TYPE):
        raise ConversionError(f"unknown export format {requested!r}; choose 'auto' or 'jai'")
    plain = mixtral if cfg.is_moe else phi3
    if requested == jai.MODEL_TYPE or plain.unsupported(cfg):
        return jai.MODEL_TYPE
    return plain.MODEL_TYPE


def hf_config_for_layout(cfg: ModelConfig, layout: str, base: Optional[dict] = None) -> dict:
    """The ``config.json`` dict of ``cfg`` in ``layout`` (see :func:`hf_layout`)."""
    return _format(layout).hf_config(cfg, base)


def tensor_map(cfg: ModelConfig, layout: Optional[str] = None) -> list[TensorMapping]:
    """Every tensor of a model with this config, in Hugging Face order, in ``layout`` (default:
    Mixtral for MoE configs, else Phi-3)."""
    layout = layout or (mixtral.MODEL_TYPE if cfg.is_moe else phi3.MODEL_TYPE)
    rows = [TensorMapping("embedding.word_embeddings.weight", ("model.embed_tokens.weight",),
                          pad_vocab, unpad_vocab)]
    rows += _format(layout).decoder_tensor_map(cfg)
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


def _format(layout: str):
    try:
        return FORMATS[layout]
    except KeyError:
        raise ConversionError(f"unknown Hugging Face layout {layout!r}") from None
