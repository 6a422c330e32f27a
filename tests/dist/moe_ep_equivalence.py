"""torchrun helper (2 ranks, EP=2): the MoE layer with experts split over 2 ranks gives the same
outputs and gradients as the same layer computed with all experts on one rank (EP=1).

Every rank routes its own tokens. The EP=1 reference on each rank uses the same router module, a
dispatcher without a group and all E experts (gathered from both ranks). Expected gradients:
input and router gradients are per rank; a local expert's gradient under EP=2 is the sum over both
ranks' tokens, i.e. the all-reduced EP=1 gradient restricted to this rank's experts.
Cases: dropless top-2; capacity factor (dropped slots); skewed routing where rank 1's experts
receive no token at all (empty all-to-all splits, zero expert gradients).
"""
import sys

import torch
import torch.distributed as dist

from megatron_jai import parallel
from megatron_jai.presets import TINY_MOE
from megatron_jai.moe.layer import moe_layer_spec
from moe_single_rank import single_rank_forward_backward

TOL = dict(rtol=1e-4, atol=1e-5)  # fp32, different summation orders


def run_case(name, cfg, skewed=False):
    from megatron.core import parallel_state
    from megatron.core.transformer.spec_utils import build_module

    rank = dist.get_rank()
    tcfg = cfg.transformer_config(ep=2)
    layer = build_module(moe_layer_spec(cfg), config=tcfg)
    layer.set_layer_number(1)
    layer.train()
    e_local = layer.experts.num_local_experts
    assert layer.dispatcher.ep_size == 2 and e_local == cfg.num_experts // 2

    # O(1) outputs and decisive routing, so the tolerances below are tight in relative terms.
    shared = torch.Generator().manual_seed(7)
    gen = torch.Generator().manual_seed(100 + rank)  # different tokens and local experts per rank
    with torch.no_grad():
        layer.router.weight.normal_(0, 0.5, generator=shared)
        layer.experts.weight_gate_up.normal_(0, 0.3, generator=gen)
        layer.experts.weight_down.normal_(0, 0.3, generator=gen)
    seq, batch, hidden = 12, 3, tcfg.hidden_size
    x = torch.randn(seq, batch, hidden, generator=gen)
    if skewed:  # a constant feature that the router maps to experts 0 and 1 only
        x[..., 0] = 10.0
        with torch.no_grad():
            layer.router.weight[:, 0] = torch.tensor([5.0, 4.0, -5.0, -5.0])
    upstream = torch.randn(seq, batch, hidden, generator=gen)

    # ---- EP = 2
    x2 = x.clone().requires_grad_(True)
    out2, _ = layer(x2)
    (out2 * upstream).sum().backward()
    grads2 = {n: p.grad.clone() for n, p in layer.named_parameters()}

    # ---- EP = 1 reference: same router, all experts on this rank, no dispatcher group
    ep_group = parallel_state.get_expert_model_parallel_group()
    full = {}
    for wname in ("weight_gate_up", "weight_down"):
        parts = [torch.empty_like(getattr(layer.experts, wname)) for _ in range(2)]
        dist.all_gather(parts, getattr(layer.experts, wname).detach().contiguous(), group=ep_group)
        full[wname] = torch.cat(parts)
    layer.zero_grad(set_to_none=True)
    out1, x1, routing, ref_experts = single_rank_forward_backward(
        layer, tcfg, cfg, full["weight_gate_up"], full["weight_down"], x, upstream)

    torch.testing.assert_close(out2, out1, **TOL)
    torch.testing.assert_close(x2.grad, x1.grad, **TOL)
    torch.testing.assert_close(grads2["router.weight"], layer.router.weight.grad, **TOL)
    lo, hi = rank * e_local, (rank + 1) * e_local
    for wname in ("weight_gate_up", "weight_down"):
        ref_grad = getattr(ref_experts, wname).grad.clone()
        dist.all_reduce(ref_grad)
        torch.testing.assert_close(grads2[f"experts.{wname}"], ref_grad[lo:hi], **TOL)
    dropped = int((routing.expert_ids < 0).sum())
    if cfg.moe_capacity_factor is not None:
        assert dropped > 0, "the capacity case should drop slots"
    if skewed:
        assert int((routing.expert_ids >= 2).sum()) == 0
        if rank == 1:
            assert layer.dispatcher is not None and grads2["experts.weight_gate_up"].abs().sum() == 0
    assert out2.abs().sum() > 0
    print(f"OK {name} rank={rank} dropped={dropped} max|out|={out2.abs().max().item():.3g}", flush=True)


def main():
    parallel.initialize(ep=2)
    cfg = TINY_MOE.replace(hidden_size=32, moe_ffn_hidden_size=24)
    run_case("dropless", cfg)
    run_case("capacity", cfg.replace(moe_capacity_factor=0.6, moe_token_drop_policy="probs"))
    run_case("skewed", cfg.replace(moe_top_k=1, moe_normalize_topk=False), skewed=True)
    parallel.destroy()


if __name__ == "__main__":
    sys.exit(main())
