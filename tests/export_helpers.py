"""Tiny models and a tiny tokenizer for the export tests: Hugging Face models of any ModelConfig
(in the layout the exporter would pick), their safetensors, and a sentencepiece tokenizer."""
from __future__ import annotations

import json
import os

import torch

from megatron_jai.config import ModelConfig, SkipConnection

TOKENIZER_VOCAB = 150  # fits every tiny model below
_BASE = ModelConfig(name="tiny-export", num_layers=4, hidden_size=64, num_attention_heads=4,
                    num_query_groups=2, ffn_hidden_size=48, vocab_size=300,
                    max_position_embeddings=128, rotary_base=500000.0, init_method_std=0.1)
# The JAI shape: skips crossing a PP=2 boundary (0->2, 1->3), a layer that is a target and a
# source (2), 4 experts top-2 with Mixtral's router.
JAI = _BASE.replace(name="tiny-jai", num_experts=4, moe_top_k=2, skip_connections=(
    SkipConnection(0, 2), SkipConnection(1, 3, 0.5, 0.7), SkipConnection(2, 3, 0.3, 0.6)))
# Skips only, on a context-extended model (new RoPE base, position interpolation).
SKIPS = _BASE.replace(name="tiny-skips", rotary_base=40000.0, rotary_interpolation_factor=2.0,
                      skip_connections=(SkipConnection(0, 2), SkipConnection(1, 3, 0.5, 0.7)))
# Experts only, with the router options Mixtral cannot express.
EXPERTS = _BASE.replace(name="tiny-experts", num_experts=4, moe_top_k=2, moe_expert_bias=True,
                        moe_normalize_topk=False)


def tiny_tokenizer(directory: str) -> str:
    """A BPE sentencepiece model (unk 0, bos 1, eos 2, sentencepiece's default NFKC normalizer)
    with at most TOKENIZER_VOCAB pieces; returns the ``.model`` path."""
    import sentencepiece as spm

    prefix = os.path.join(directory, "tiny_sp")
    if not os.path.isfile(prefix + ".model"):
        os.makedirs(directory, exist_ok=True)
        lines = [f"the {a} cat saw {n} {b} dogs near the {c} river." for a in ("red", "blue", "old")
                 for b in ("big", "small") for c in ("quiet", "wide", "cold") for n in range(12)]
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_prefix=prefix, model_type="bpe",
            vocab_size=TOKENIZER_VOCAB, hard_vocab_limit=False, minloglevel=2, num_threads=1,
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1)
    return prefix + ".model"


def save_hf_model(cfg: ModelConfig, path, seed: int = 0):
    """A random Hugging Face JAI model of ``cfg``, saved with ``save_pretrained`` (norm weights and
    expert biases away from their trivial init)."""
    from megatron_jai.checkpoint.formats.jai import hf_config as jai_hf_config_from_model_config
    from megatron_jai.hf.configuration_jai import JaiConfig
    from megatron_jai.hf.modeling_jai import JaiForCausalLM

    fields = jai_hf_config_from_model_config(cfg)
    fields.update(bos_token_id=1, eos_token_id=2, pad_token_id=2)
    torch.manual_seed(seed)
    model = JaiForCausalLM(JaiConfig(**{k: v for k, v in fields.items()
                                        if k not in ("architectures", "auto_map", "model_type")}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
        for name, b in model.named_buffers():
            if name.endswith("expert_bias"):
                b.uniform_(-0.05, 0.05)
    model.save_pretrained(path)
    return model


def safetensors_dict(path) -> dict:
    from safetensors import safe_open

    index = os.path.join(path, "model.safetensors.index.json")
    files = sorted(set(json.load(open(index))["weight_map"].values())) if os.path.isfile(index) \
        else ["model.safetensors"]
    out = {}
    for name in files:
        with safe_open(os.path.join(path, name), "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out
