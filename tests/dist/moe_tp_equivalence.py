"""torchrun helper (2 ranks, TP=2): the MoE layer with experts split over TP along F gives the same
outputs and gradients as the same layer at TP=1 (all F columns on one rank).

Both ranks see the same tokens (TP ranks hold replicated activations). The TP=1 reference on each
rank uses the same router module, the full expert weights and no TP communication. Expected: equal
outputs, equal input and router gradients on both ranks, and expert gradients whose slices,
reassembled over TP ([gate slices; up slices] for ``weight_gate_up``, F columns for
``weight_down``), equal the reference's full gradients. Also: CPU initialisation gives each TP rank
its slice of the TP=1 weights.
"""
import sys

import torch
import torch.distributed as dist

from megatron_jai import parallel
from megatron_jai.config import TINY_MOE
from megatron_jai.moe.experts import GroupedExperts
from megatron_jai.moe.layer import moe_layer_spec, router_options
from megatron_jai.moe.router import TopKRouter
from moe_single_rank import single_rank_forward_backward

TOL = dict(rtol=1e-4, atol=1e-5)  # fp32, different summation orders


def gather_full(local_gate_up, local_down, group):
    """Full [E, 2F, H] and [E, H, F] from the TP ranks' slices."""
    n = dist.get_world_size(group)
    gu = [torch.empty_like(local_gate_up) for _ in range(n)]
    dn = [torch.empty_like(local_down) for _ in range(n)]
    dist.all_gather(gu, local_gate_up.contiguous(), group=group)
    dist.all_gather(dn, local_down.contiguous(), group=group)
    halves = [torch.chunk(g, 2, dim=1) for g in gu]
    gate_up = torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=1)
    return gate_up, torch.cat(dn, dim=2)


def run_case(name, cfg):
    from megatron.core import parallel_state
    from megatron.core.transformer.spec_utils import build_module

    rank = dist.get_rank()
    tp_group = parallel_state.get_tensor_model_parallel_group()
    tcfg = cfg.transformer_config(tp=2)
    torch.manual_seed(11)
    layer = build_module(moe_layer_spec(cfg), config=tcfg)
    layer.set_layer_number(1)
    layer.train()
    f = cfg.expert_ffn_hidden_size
    assert layer.experts.tp_size == 2 and layer.experts.weight_down.shape[-1] == f // 2
    assert layer.experts.weight_gate_up.shape[1] == f

    # CPU init: this rank's slices of the weights a TP=1 build draws from the same seed.
    torch.manual_seed(11)
    TopKRouter(tcfg, router_options(cfg))  # drawn before the experts, as in the layer
    tp1 = GroupedExperts(tcfg, cfg.num_experts, f, 1, 0, tp_size=1, tp_rank=0)
    want_gu, want_dn = layer.experts.local_slices(tp1.weight_gate_up.detach(), tp1.weight_down.detach())
    assert torch.equal(layer.experts.weight_gate_up.detach(), want_gu)
    assert torch.equal(layer.experts.weight_down.detach(), want_dn)

    # O(1) outputs and decisive routing (the same on both ranks).
    gen = torch.Generator().manual_seed(7)
    full_gu = torch.randn(cfg.num_experts, 2 * f, tcfg.hidden_size, generator=gen) * 0.3
    full_dn = torch.randn(cfg.num_experts, tcfg.hidden_size, f, generator=gen) * 0.3
    with torch.no_grad():
        layer.router.weight.normal_(0, 0.5, generator=gen)
        gu, dn = layer.experts.local_slices(full_gu, full_dn)
        layer.experts.weight_gate_up.copy_(gu)
        layer.experts.weight_down.copy_(dn)
    seq, batch, hidden = 12, 3, tcfg.hidden_size
    x = torch.randn(seq, batch, hidden, generator=gen)
    upstream = torch.randn(seq, batch, hidden, generator=gen)

    # ---- TP = 2
    x2 = x.clone().requires_grad_(True)
    out2, _ = layer(x2)
    (out2 * upstream).sum().backward()
    grads2 = {n: p.grad.clone() for n, p in layer.named_parameters()}

    # ---- TP = 1 reference: same router, full experts, no TP communication
    layer.zero_grad(set_to_none=True)
    out1, x1, routing, ref_experts = single_rank_forward_backward(
        layer, tcfg, cfg, full_gu, full_dn, x, upstream)

    torch.testing.assert_close(out2, out1, **TOL)
    torch.testing.assert_close(x2.grad, x1.grad, **TOL)
    torch.testing.assert_close(grads2["router.weight"], layer.router.weight.grad, **TOL)
    got_gu, got_dn = gather_full(grads2["experts.weight_gate_up"], grads2["experts.weight_down"],
                                 tp_group)
    torch.testing.assert_close(got_gu, ref_experts.weight_gate_up.grad, **TOL)
    torch.testing.assert_close(got_dn, ref_experts.weight_down.grad, **TOL)
    assert out2.abs().sum() > 0 and got_gu.abs().sum() > 0
    print(f"OK {name} rank={rank} max|out|={out2.abs().max().item():.3g}", flush=True)


def main():
    parallel.initialize(tp=2)
    cfg = TINY_MOE.replace(hidden_size=32, moe_ffn_hidden_size=24)
    run_case("dropless", cfg)
    run_case("capacity", cfg.replace(moe_capacity_factor=0.6, moe_token_drop_policy="probs"))
    parallel.destroy()


if __name__ == "__main__":
    sys.exit(main())
