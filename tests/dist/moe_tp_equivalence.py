"""torchrun helper (4 ranks): the MoE layer with experts split over TP along F gives the same
outputs and gradients as the same layer at TP=1 (all F columns, all experts on one rank), at

* TP=2: tokens replicated over the TP ranks;
* TP=2 with sequence parallelism: each TP rank holds s/2 of the sequence, the layer gathers the
  tokens for routing and reduce-scatters its output (also with a padding mask, scattered along the
  sequence as GPTModel does);
* TP=2 with sequence parallelism and EP=2 (expert TP = TP, so TP x EP = 4 ranks).

Each TP group (a data-parallel replica) has its own tokens; the TP=1 reference on every rank runs
its group's whole sequence through the same router module and the full expert weights, without
communication. Expected: the rank's part of the reference output and input gradient; the router
gradient of the reference, after summing over TP the parameters Megatron marks
``sequence_parallel`` (what ``finalize_model_grads`` does); expert gradients equal to this rank's
slice (its experts, its F columns) of the reference gradients summed over the EP group. Also: CPU
initialisation gives each TP rank its slice of the TP=1 weights.
"""
import sys

import torch
import torch.distributed as dist

from megatron_jai import parallel
from megatron_jai.presets import TINY_MOE
from megatron_jai.moe.experts import GroupedExperts
from megatron_jai.moe.layer import moe_layer_spec, router_options
from megatron_jai.moe.router import TopKRouter
from moe_single_rank import single_rank_forward_backward

TOL = dict(rtol=1e-4, atol=1e-5)  # fp32, different summation orders


def check_cpu_init(layer, tcfg, cfg):
    """This rank's expert slices are those of the weights a TP=1 build draws from the same seed."""
    torch.manual_seed(11)
    TopKRouter(tcfg, router_options(cfg))  # drawn before the experts, as in the layer
    tp1 = GroupedExperts(tcfg, cfg.num_experts, cfg.expert_ffn_hidden_size, 1, 0, tp_size=1,
                         tp_rank=0)
    want_gu, want_dn = layer.experts.local_slices(tp1.weight_gate_up.detach(),
                                                  tp1.weight_down.detach())
    assert torch.equal(layer.experts.weight_gate_up.detach(), want_gu)
    assert torch.equal(layer.experts.weight_down.detach(), want_dn)


def run_case(name, cfg, sp=False, ep=1, padding=False):
    from megatron.core import parallel_state
    from megatron.core.transformer.spec_utils import build_module

    parallel.initialize(tp=2, ep=ep)
    tp_group = parallel_state.get_tensor_model_parallel_group()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    replica = dist.get_rank() // 2  # the TP group: its own tokens
    tcfg = cfg.transformer_config(tp=2, ep=ep, sequence_parallel=sp)
    torch.manual_seed(11)
    layer = build_module(moe_layer_spec(cfg), config=tcfg)
    layer.set_layer_number(1)
    layer.train()
    f = cfg.expert_ffn_hidden_size
    assert layer.experts.tp_size == 2 and layer.experts.weight_down.shape[-1] == f // 2
    assert layer.dispatcher.ep_size == ep
    assert layer.router.weight.sequence_parallel == sp
    if ep == 1:
        check_cpu_init(layer, tcfg, cfg)

    # O(1) outputs and decisive routing; the weights are the same on every rank.
    shared = torch.Generator().manual_seed(7)
    full_gu = torch.randn(cfg.num_experts, 2 * f, tcfg.hidden_size, generator=shared) * 0.3
    full_dn = torch.randn(cfg.num_experts, tcfg.hidden_size, f, generator=shared) * 0.3
    with torch.no_grad():
        layer.router.weight.normal_(0, 0.5, generator=shared)
        gu, dn = layer.experts.local_slices(full_gu, full_dn)
        layer.experts.weight_gate_up.copy_(gu)
        layer.experts.weight_down.copy_(dn)
    gen = torch.Generator().manual_seed(100 + replica)
    seq, batch, hidden = 12, 3, tcfg.hidden_size
    x = torch.randn(seq, batch, hidden, generator=gen)
    upstream = torch.randn(seq, batch, hidden, generator=gen)
    pad = torch.zeros(batch, seq, dtype=torch.bool)  # [b, s] True = padding
    if padding:
        pad[1, 2:] = True
        pad[2, 9:] = True
    part = slice(tp_rank * seq // 2, (tp_rank + 1) * seq // 2) if sp else slice(None)

    # ---- TP = 2 (sequence parallel: this rank's half of the sequence)
    x2 = x[part].clone().requires_grad_(True)
    out2, _ = layer(x2, padding_mask=pad[:, part] if padding else None)
    (out2 * upstream[part]).sum().backward()
    grads2 = {n: p.grad.clone() for n, p in layer.named_parameters()}
    for n, p in layer.named_parameters():  # finalize_model_grads' TP reduction
        if getattr(p, "sequence_parallel", False):
            dist.all_reduce(grads2[n], group=tp_group)

    # ---- TP = 1 reference: same router, full experts, the whole sequence, no communication
    layer.zero_grad(set_to_none=True)
    mask = ~pad.t().reshape(-1) if padding else None
    out1, x1, routing, ref = single_rank_forward_backward(
        layer, tcfg, cfg, full_gu, full_dn, x, upstream, mask)

    torch.testing.assert_close(out2, out1[part], **TOL)
    torch.testing.assert_close(x2.grad, x1.grad[part], **TOL)
    torch.testing.assert_close(grads2["router.weight"], layer.router.weight.grad, **TOL)
    ref_gu, ref_dn = ref.weight_gate_up.grad, ref.weight_down.grad
    if ep > 1:  # a local expert's gradient sums the tokens of every EP rank
        for g in (ref_gu, ref_dn):
            dist.all_reduce(g, group=parallel_state.get_expert_model_parallel_group())
    want_gu, want_dn = layer.experts.local_slices(ref_gu, ref_dn)
    torch.testing.assert_close(grads2["experts.weight_gate_up"], want_gu, **TOL)
    torch.testing.assert_close(grads2["experts.weight_down"], want_dn, **TOL)
    dropped = int((routing.expert_ids < 0).sum())
    if cfg.moe_capacity_factor is not None:
        assert dropped > 0, "the capacity case should drop slots"
    assert out2.abs().sum() > 0 and grads2["experts.weight_gate_up"].abs().sum() > 0
    print(f"OK {name} rank={dist.get_rank()} dropped={dropped} "
          f"max|out|={out2.abs().max().item():.3g}", flush=True)


def main():
    cfg = TINY_MOE.replace(hidden_size=32, moe_ffn_hidden_size=24)
    capacity = cfg.replace(moe_capacity_factor=0.6, moe_token_drop_policy="probs")
    run_case("tp2-dropless", cfg)
    run_case("tp2-capacity", capacity)
    run_case("tp2-sp-padding", cfg, sp=True, padding=True)
    run_case("tp2-sp-capacity", capacity, sp=True)
    run_case("tp2-sp-ep2-dropless", cfg, sp=True, ep=2)
    run_case("tp2-sp-ep2-capacity", capacity.replace(moe_token_drop_policy="position"), sp=True,
             ep=2)
    parallel.destroy()


if __name__ == "__main__":
    sys.exit(main())
