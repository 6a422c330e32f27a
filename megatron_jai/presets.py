"""Named model configurations: Phi-3-medium, the JAI-1-style 75B, and tiny CPU models; and
:func:`load_model_config`, which takes a preset name or a ``model_config.json``."""
from __future__ import annotations

import os

from megatron_jai.config import ModelConfig, repeat_skips

# JAI-1's DUS.v2 layout on Phi-3-medium (the Solar-Pro layout): 10 blocks of 4 layers, the middle
# ones repeated, 40 -> 64 layers. The built-in DUS plan ``phi3-medium-jai`` and the jai-75b preset
# both come from here (megatron_jai.upscale.plan).
PHI3_MEDIUM_JAI_PLAN = {"base_layers": 40, "block_size": 4,
                        "multiplicities": [1, 1, 1, 2, 3, 3, 2, 1, 1, 1], "skips": "repeat"}

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
    # The skips of the repeated blocks: 12->16, 20->24, 20->28, 32->36, 32->40, 44->48.
    skip_connections=repeat_skips(PHI3_MEDIUM_JAI_PLAN["block_size"],
                                  PHI3_MEDIUM_JAI_PLAN["multiplicities"]),
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
