"""Layer specs: which modules fill the slots of Megatron-Core's ``TransformerLayer``.

Transformer Engine modules on GPU when TE is importable, Megatron-Core's local modules otherwise.
Both produce the same distributed-checkpoint keys (the local spec maps its norm names onto TE's
fused ones), so a checkpoint moves freely between the two. The MLP slot is the extension point:
dense SwiGLU MLP, or the MoE layer of ``megatron_jai.moe`` when the config has experts.

The local spec's norms are :class:`LocalRMSNorm` (what Megatron's ``WrappedTorchNorm`` builds, but
usable with sequence parallelism); :func:`decoder_spec` also makes it the final norm.
"""
from __future__ import annotations

import dataclasses
import os
import sys

import torch
from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_jai.config import ModelConfig


class LocalRMSNorm(torch.nn.RMSNorm):
    """``torch.nn.RMSNorm`` as Megatron's ``WrappedTorchNorm`` builds it (same parameter, same
    checkpoint key), also under sequence parallelism, which ``WrappedTorchNorm`` refuses: the weight
    carries Megatron's ``sequence_parallel`` marker, so ``finalize_model_grads`` sums its gradient
    over TP as it does for Transformer Engine's norms."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **unused):
        super().__init__(hidden_size, eps=eps)
        self.weight.sequence_parallel = config.sequence_parallel


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


MOE_LAYERS = ("jai", "mcore")


def moe_layer_choice() -> str:
    """``JAI_MOE_LAYER``: ``jai`` (default, ours) or ``mcore`` (Megatron-Core's own MoE layer, for
    side-by-side measurements: tools/bench_train.py; it has other checkpoint keys than ours)."""
    choice = os.environ.get("JAI_MOE_LAYER", "jai").lower()
    if choice not in MOE_LAYERS:
        raise ValueError(f"JAI_MOE_LAYER must be one of {MOE_LAYERS}, got {choice!r}")
    return choice


def mlp_spec(cfg: ModelConfig, use_te: bool) -> ModuleSpec:
    """The MLP slot: our MoE layer when the config has experts, else the dense base spec's MLP."""
    if cfg.is_moe and moe_layer_choice() == "mcore":
        from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec

        # Its grouped GEMM is Transformer Engine's (TEGroupedMLP); without TE, a loop over experts.
        return get_moe_module_spec(use_te=use_te, num_experts=cfg.num_experts, moe_grouped_gemm=use_te)
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
    submodules = spec.submodules
    if not use_te:
        submodules = dataclasses.replace(submodules, input_layernorm=LocalRMSNorm,
                                         pre_mlp_layernorm=LocalRMSNorm)
    mlp = mlp_spec(cfg, use_te)
    if mlp is not None:
        submodules = dataclasses.replace(submodules, mlp=mlp)
        if not use_te:
            # The MoE layer owns no fused norm, so the pre-MLP norm keeps its own checkpoint key.
            keys_map = dict(submodules.sharded_state_dict_keys_map)
            keys_map.pop("pre_mlp_layernorm.", None)
            submodules = dataclasses.replace(submodules, sharded_state_dict_keys_map=keys_map)
        elif use_te:
            from megatron.core.extensions.transformer_engine import TENorm

            submodules = dataclasses.replace(submodules, pre_mlp_layernorm=TENorm)
    return ModuleSpec(module=spec.module, params=spec.params, submodules=submodules)


def decoder_spec(cfg: ModelConfig, config, use_te: bool | None = None, vp_stage=None):
    """The decoder spec ``GPTModel`` takes: the layer spec with Transformer Engine (its final norm
    is TE's), else block submodules for this stage's layers with :class:`LocalRMSNorm` as the final
    norm (Megatron's default there, ``WrappedTorchNorm``, refuses sequence parallelism)."""
    from megatron.core.transformer.transformer_block import (
        TransformerBlockSubmodules,
        get_num_layers_to_build,
    )

    spec = layer_spec(cfg, use_te)
    if use_te is None:
        use_te = transformer_engine_available()
    if use_te:
        return spec
    return TransformerBlockSubmodules(
        layer_specs=[spec] * get_num_layers_to_build(config, vp_stage=vp_stage),
        layer_norm=LocalRMSNorm)
