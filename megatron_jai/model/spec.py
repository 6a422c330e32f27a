"""Layer specs: which modules fill the slots of Megatron-Core's ``TransformerLayer``.

Transformer Engine modules on GPU when TE is importable, Megatron-Core's local modules otherwise.
Both produce the same distributed-checkpoint keys (the local spec maps its norm names onto TE's
fused ones), so a checkpoint moves freely between the two. The MLP slot is the extension point:
dense SwiGLU MLP, or the MoE layer of ``megatron_jai.moe`` when the config has experts.
"""
from __future__ import annotations

import dataclasses
import sys

import torch
from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_jai.config import ModelConfig


def transformer_engine_available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


_noted_local_layers = False


def _note_local_layers() -> None:
    """One short line (rank 0, once) instead of Megatron-Core's TE/apex fallback warnings, which
    ``cli.quiet_warnings`` silences."""
    global _noted_local_layers
    if _noted_local_layers or (torch.distributed.is_initialized() and torch.distributed.get_rank()):
        return
    _noted_local_layers = True
    why = "on CPU" if not torch.cuda.is_available() else "Transformer Engine not installed"
    print(f"note: {why}: Megatron-Core's local layers and torch optimizers (no TE/apex)",
          file=sys.stderr, flush=True)


def mlp_spec(cfg: ModelConfig, use_te: bool) -> ModuleSpec:
    """The MLP slot: our MoE layer when the config has experts, else the dense base spec's MLP."""
    if cfg.is_moe:
        from megatron_jai.moe.layer import moe_layer_spec

        return moe_layer_spec(cfg, use_te=use_te)
    return None  # keep the dense MLP of the base spec


def layer_spec(cfg: ModelConfig, use_te: bool | None = None) -> ModuleSpec:
    """The ``TransformerLayer`` spec for ``cfg``."""
    from megatron.core.models.gpt import gpt_layer_specs

    if use_te is None:
        use_te = transformer_engine_available()
        if not use_te:
            _note_local_layers()
    if use_te:
        spec = gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec()
    else:
        spec = gpt_layer_specs.get_gpt_layer_local_spec(normalization="RMSNorm")
    mlp = mlp_spec(cfg, use_te)
    if mlp is not None:
        submodules = dataclasses.replace(spec.submodules, mlp=mlp)
        if not use_te:
            # The MoE layer owns no fused norm, so the pre-MLP norm keeps its own checkpoint key.
            keys_map = dict(submodules.sharded_state_dict_keys_map)
            keys_map.pop("pre_mlp_layernorm.", None)
            submodules = dataclasses.replace(submodules, sharded_state_dict_keys_map=keys_map)
        elif use_te:
            from megatron.core.extensions.transformer_engine import TENorm

            submodules = dataclasses.replace(submodules, pre_mlp_layernorm=TENorm)
        spec = ModuleSpec(module=spec.module, params=spec.params, submodules=submodules)
    return spec
