"""The stable functional API of the MoE expert computation (what the layer, tests and benchmarks call).

* :func:`routing_metadata` -- tokens per expert, stable sort of the slots by expert and its inverse,
  group offsets (CUDA op on GPU tensors, C++ op on CPU, torch reference as a last resort).
* :func:`grouped_expert_ffn` -- ``sum_j weights[:, j] * expert_{ids[:, j]}(hidden)`` for given
  routing (local expert ids, -1 = skip); the Triton grouped-GEMM kernels or the torch reference.
* :func:`moe_ffn` -- the whole MoE FFN from router logits: fp32 softmax, top-k, optional
  renormalisation, then :func:`grouped_expert_ffn`.

Backend choice (``backend=`` argument, else the ``JAI_MOE_BACKEND`` environment variable, else
``"auto"``): ``"triton"`` runs the kernels (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``,
which must be set before the kernels are first imported); ``"reference"`` runs plain torch;
``"auto"`` picks Triton where it can run and the reference otherwise. Conventions (slot order, the
-1 = skip id, routing metadata) are documented in :mod:`megatron_jai.kernels.routing`. The Triton
kernels are imported on first use, since their first import fixes Triton's interpreter mode.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from megatron_jai.kernels.routing import routing_metadata  # noqa: F401 (part of this API)
from megatron_jai.moe.reference import topk_routing

BACKENDS = ("auto", "triton", "reference")


def _interpreter_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def triton_available(device: torch.device) -> bool:
    """True where the Triton expert kernels can run on tensors of ``device``."""
    device = torch.device(device)
    if device.type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            return False
        return True
    if device.type == "cpu" and _interpreter_requested():
        from megatron_jai.kernels import moe_grouped_gemm

        # The interpreter is chosen when the kernels are decorated, i.e. at their first import.
        return moe_grouped_gemm.INTERPRET
    return False


def resolve_backend(backend: Optional[str], device: torch.device) -> str:
    """``"triton"`` or ``"reference"`` for an explicit choice, ``JAI_MOE_BACKEND``, or auto."""
    choice = (backend or os.environ.get("JAI_MOE_BACKEND") or "auto").lower()
    if choice not in BACKENDS:
        raise ValueError(f"MoE backend must be one of {BACKENDS}, got {choice!r}")
    if choice == "auto":
        return "triton" if triton_available(device) else "reference"
    if choice == "triton" and not triton_available(device):
        raise RuntimeError(
            f"the Triton MoE kernels cannot run on {device} tensors: use CUDA tensors, or set "
            "TRITON_INTERPRET=1 before importing megatron_jai.kernels for CPU tensors")
    return choice


def grouped_expert_ffn(
    hidden: torch.Tensor,
    expert_ids: torch.Tensor,
    weights: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    activation: str = "swiglu",
    *,
    backend: Optional[str] = None,
    recompute_activation: bool = False,
) -> torch.Tensor:
    """Weighted sum of the routed experts of each token.

    hidden ``[N, H]``, expert_ids ``[N, k]`` (local expert index, -1 = skip), weights ``[N, k]``
    (routing weights, any float dtype; fp32 from the router), w_gate_up ``[E, 2F, H]``, w_down
    ``[E, H, F]`` -> ``[N, H]`` in ``hidden.dtype``. Differentiable in hidden, weights, w_gate_up and
    w_down. ``recompute_activation=True`` (Triton only) keeps only the pre-activation for backward and
    recomputes ``silu(gate) * up`` there, saving ``N * k * F`` elements of activation memory.
    """
    from megatron_jai.kernels import moe_grouped_gemm as kernels

    kernels.check_expert_inputs(hidden, expert_ids, weights, w_gate_up, w_down, activation)
    if resolve_backend(backend, hidden.device) == "triton":
        return kernels.grouped_expert_ffn_triton(hidden, expert_ids, weights, w_gate_up, w_down,
                                                 recompute_activation=recompute_activation)
    return kernels.grouped_expert_ffn_reference(hidden, expert_ids, weights, w_gate_up, w_down, activation)


def moe_ffn(
    hidden: torch.Tensor,
    router_logits: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    top_k: int,
    normalize_topk: bool = True,
    *,
    backend: Optional[str] = None,
    recompute_activation: bool = False,
) -> torch.Tensor:
    """The MoE FFN: hidden ``[T, H]``, router_logits ``[T, E]``, w_gate_up ``[E, 2F, H]``, w_down
    ``[E, H, F]`` -> ``[T, H]``. Softmax in fp32, top-k, weights renormalised to sum to 1 when
    ``normalize_topk``; differentiable in all tensor inputs (the router logits through the top-k
    weights)."""
    if router_logits.dim() != 2 or router_logits.shape[0] != hidden.shape[0] \
            or router_logits.shape[1] != w_gate_up.shape[0]:
        raise ValueError(f"router_logits must be [T={hidden.shape[0]}, E={w_gate_up.shape[0]}], "
                         f"got shape {tuple(router_logits.shape)}")
    weights, expert_ids = topk_routing(router_logits, top_k, normalize_topk)
    return grouped_expert_ffn(hidden, expert_ids, weights, w_gate_up, w_down, backend=backend,
                              recompute_activation=recompute_activation)
