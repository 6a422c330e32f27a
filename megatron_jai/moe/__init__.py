"""Mixture of experts: router, expert-parallel dispatcher, grouped experts, the Megatron-Core layer,
and the stable functional API of the expert computation.

Imports are lazy, so ``import megatron_jai.moe`` is cheap and pulls in neither Megatron-Core nor
Triton until a name is used:

* functional API (:mod:`megatron_jai.moe.functional`): ``moe_ffn``, ``grouped_expert_ffn``,
  ``routing_metadata``;
* layer (:mod:`megatron_jai.moe.layer`): ``JaiMoELayer``, ``moe_layer_spec``,
  ``collect_router_stats``, ``update_expert_biases``;
* parts: ``TopKRouter``, ``RouterOptions`` (:mod:`~megatron_jai.moe.router`),
  ``AllToAllDispatcher`` (:mod:`~megatron_jai.moe.dispatcher`), ``GroupedExperts``
  (:mod:`~megatron_jai.moe.experts`).
"""
import importlib

_EXPORTS = {
    "moe_ffn": "functional",
    "grouped_expert_ffn": "functional",
    "routing_metadata": "functional",
    "JaiMoELayer": "layer",
    "moe_layer_spec": "layer",
    "collect_router_stats": "layer",
    "update_expert_biases": "layer",
    "TopKRouter": "router",
    "RouterOptions": "router",
    "AllToAllDispatcher": "dispatcher",
    "GroupedExperts": "experts",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
