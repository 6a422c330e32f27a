"""MoE upcycling: turn every dense SwiGLU FFN of a checkpoint into ``E`` experts of
:mod:`megatron_jai.moe` (sparse upcycling, Komatsuzaki et al. 2023; JAI-1 section 3).

Expert ``i`` is the FFN of input checkpoint ``i mod n`` (``n`` inputs): JAI-1 seeds its 4 experts
from 4 snapshots of continued training (steps 0, 2K, 4K, 6K); with one input every expert is a copy,
optionally perturbed by Gaussian noise (experts 1..E-1; expert 0 stays exact). The router starts
near uniform: ``router.weight ~ N(0, router_std^2)``. By default ``router_std`` is chosen per layer
so that the router logits have a standard deviation of about ``ROUTER_LOGIT_STD`` (probabilities
within ~1% of uniform, but every token with its own top-k): the router reads the pre-MLP RMSNorm
output, whose norm is about that of the norm's weight ``g``, so ``router_std = ROUTER_LOGIT_STD /
|g|``. ``router_std=0`` gives exactly uniform probabilities, but then every tie is broken the same
way and ALL tokens go to the same k experts (with a capacity factor the rest are dropped).
Attention, norms and embeddings come from one input (``shared_from``: the first, or the last: the
newest of chronological snapshots, as JAI-1 continues from the end of English recovery), or their
mean over the inputs.

With identical experts and normalised top-k weights the upcycled model computes exactly the dense
model's function, whatever the router does; the tests check that.

Key mapping (stacked ``[L, ...]`` tensors; see ``megatron_jai/moe/experts.py`` and ``docs/moe.md``)::

    mlp.linear_fc1.weight [L,2F,H]  ->  mlp.experts.weight_gate_up [L,E,2F,H]
    mlp.linear_fc2.weight [L,H,F]   ->  mlp.experts.weight_down    [L,E,H,F]
    mlp.linear_fc1.layer_norm_weight -> pre_mlp_layernorm.weight    (the MoE layer owns no fused norm)
    (new)                            ->  mlp.router.weight          [L,E,H]
"""
from __future__ import annotations

import os
from typing import Sequence

import torch

from megatron_jai.checkpoint.stream import Surgery
from megatron_jai.cli import UserError
from megatron_jai.config import ModelConfig

LAYERS = "decoder.layers."
DENSE_FC1 = LAYERS + "mlp.linear_fc1.weight"
DENSE_FC2 = LAYERS + "mlp.linear_fc2.weight"
DENSE_PRE_MLP_NORM = LAYERS + "mlp.linear_fc1.layer_norm_weight"
MOE_GATE_UP = LAYERS + "mlp.experts.weight_gate_up"
MOE_DOWN = LAYERS + "mlp.experts.weight_down"
MOE_ROUTER = LAYERS + "mlp.router.weight"
MOE_EXPERT_BIAS = LAYERS + "mlp.router.expert_bias"  # only with cfg.moe_expert_bias
MOE_PRE_MLP_NORM = LAYERS + "pre_mlp_layernorm.weight"
FFN_MAP = {DENSE_FC1: MOE_GATE_UP, DENSE_FC2: MOE_DOWN}
ROUTER_LOGIT_STD = 0.01  # default router init: logit std (see the module docstring)
RENAMED = {DENSE_PRE_MLP_NORM: MOE_PRE_MLP_NORM}
SHARED_FROM = ("first", "last", "mean")  # where attention, norms and embeddings come from


class UpcycleError(UserError):
    """Inputs that cannot be upcycled together (a user error)."""


def _architecture(cfg: ModelConfig) -> dict:
    d = cfg.to_dict()
    d.pop("name")
    return d


def moe_config(dense: ModelConfig, num_experts: int, top_k: int, name: str | None = None) -> ModelConfig:
    if dense.is_moe:
        raise UpcycleError(f"model {dense.name!r} already has {dense.num_experts} experts")
    if num_experts < 2:
        raise UpcycleError(f"--experts must be at least 2, got {num_experts}")
    if not 1 <= top_k <= num_experts:
        raise UpcycleError(f"--top-k must be in [1, {num_experts}], got {top_k}")
    return dense.replace(name=name or f"{dense.name}-moe{num_experts}", num_experts=num_experts,
                         moe_top_k=top_k, moe_ffn_hidden_size=None, moe_normalize_topk=True)


def upcycle(sources: Sequence[str], out: str, num_experts: int = 4, top_k: int = 2, *,
            noise_std: float = 0.0, router_std: float | None = None, average_shared: bool = False,
            shared_from: str = "first", seed: int = 0, name: str | None = None,
            force: bool = False, progress: bool = True) -> dict:
    """Write the upcycled MoE checkpoint ``out``. Returns a summary dict. ``shared_from``
    (``first``, ``last`` or ``mean``; ``average_shared`` is ``mean``) picks the input of the
    attention, norms and embeddings."""
    if average_shared:
        if shared_from == "last":
            raise UpcycleError("shared weights: --average-shared and --shared-from last exclude each other")
        shared_from = "mean"
    if shared_from not in SHARED_FROM:
        raise UpcycleError(f"shared weights from {shared_from!r}: choose one of {', '.join(SHARED_FROM)}")
    if not sources:
        raise UpcycleError("at least one input checkpoint is needed")
    if len(sources) > num_experts:
        raise UpcycleError(f"{len(sources)} input checkpoints for {num_experts} experts: give at "
                           f"most one per expert")
    if noise_std < 0 or (router_std is not None and router_std < 0):
        raise UpcycleError("--noise-std and --router-std must be >= 0")
    surgery = Surgery(sources)
    surgery.check_layers()
    readers, dense = surgery.readers, surgery.config
    for src, r in zip(sources[1:], readers[1:]):
        if _architecture(r.config) != _architecture(dense):
            raise UpcycleError(f"{src} has a different architecture than {sources[0]}")
    cfg = moe_config(dense, num_experts, top_k, name)
    for key in (DENSE_FC1, DENSE_FC2):
        if key not in surgery.stacked:
            raise UpcycleError(f"{sources[0]} has no dense FFN tensor {key}")
    gen = torch.Generator().manual_seed(seed)
    dtype = readers[0].dtype(DENSE_FC1)

    def shared(read):  # attention, norms, embeddings: the first or last input's, or the mean
        if shared_from != "mean" or len(readers) == 1:
            return read(readers[-1 if shared_from == "last" else 0])
        first = read(readers[0])
        acc = first.double()
        for r in readers[1:]:
            acc += read(r).double()
        return (acc / len(readers)).to(first.dtype)

    def moe_layer(layer):
        norm_weight = None
        for key in surgery.stacked:
            if key in FFN_MAP:
                per_input = [r.read_layer(key, layer) for r in readers]
                experts = torch.stack([per_input[i % len(readers)] for i in range(num_experts)]).clone()
                del per_input
                if noise_std > 0 and len(readers) == 1:
                    noise = torch.randn(experts[1:].shape, generator=gen, dtype=torch.float32)
                    experts[1:] += (noise * noise_std).to(experts.dtype)
                yield FFN_MAP[key], experts
                del experts  # one layer of one tensor in memory
            else:
                tensor = shared(lambda r: r.read_layer(key, layer))
                if key in (DENSE_PRE_MLP_NORM, MOE_PRE_MLP_NORM):
                    norm_weight = tensor
                yield RENAMED.get(key, key), tensor
        std = router_std
        if std is None:
            # |router input| ~ |norm weight| (RMSNorm output: unit RMS times the weight)
            scale = norm_weight.float().norm().item() if norm_weight is not None \
                else dense.hidden_size ** 0.5
            std = ROUTER_LOGIT_STD / max(scale, 1e-6)
        router = torch.randn(num_experts, dense.hidden_size, generator=gen) * std
        yield MOE_ROUTER, router.to(dtype)
        if cfg.moe_expert_bias:
            yield MOE_EXPERT_BIAS, torch.zeros(num_experts)

    bytes_written = surgery.write(out, cfg, tensor=lambda key: shared(lambda r: r.read(key)),
                                  layer=moe_layer, force=force, progress=progress,
                                  desc="moe layers")
    counts = cfg.parameter_counts()
    return {"out": os.path.abspath(out), "experts": num_experts, "top_k": top_k,
            "inputs": len(sources), "layers": dense.num_layers, "config": cfg,
            "params_total": counts["total"], "params_active": counts["active"],
            "bytes": bytes_written}
