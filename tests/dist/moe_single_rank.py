"""The reference both MoE equivalence helpers compare against: the layer's router, all experts on
this rank (EP = 1, TP = 1), no communication."""
import torch

from megatron_jai.moe.dispatcher import AllToAllDispatcher
from megatron_jai.moe.experts import GroupedExperts


def single_rank_forward_backward(layer, tcfg, cfg, full_gate_up, full_down, x, upstream,
                                 token_mask=None):
    """Forward ``x`` through ``layer.router`` and full experts, backward ``upstream``
    (``token_mask`` [s * b]: True = real token, for the router's losses).

    Returns ``(out, x_with_grad, routing, experts)``; the router's gradient lands in
    ``layer.router.weight.grad`` (the caller zeroes the layer's grads first)."""
    experts = GroupedExperts(tcfg, cfg.num_experts, cfg.expert_ffn_hidden_size, 1, 0,
                             tp_size=1, tp_rank=0)
    with torch.no_grad():
        experts.weight_gate_up.copy_(full_gate_up)
        experts.weight_down.copy_(full_down)
    dispatcher = AllToAllDispatcher(cfg.num_experts, None)
    x1 = x.clone().requires_grad_(True)
    tokens = x1.reshape(-1, x.shape[-1])
    routing = layer.router(tokens, token_mask)
    d = dispatcher.dispatch(tokens, routing.expert_ids, routing.weights)
    out = dispatcher.combine(experts(d.hidden, d.expert_ids, d.weights), d).view_as(x1)
    (out * upstream).sum().backward()
    return out, x1, routing, experts
