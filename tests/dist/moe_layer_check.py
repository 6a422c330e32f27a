"""Single-process checks of the MoE layer (EP=1), run as a subprocess by tests/test_moe_layer.py.

Usage: moe_layer_check.py CHECK...   (CHECK: reference | triton | model)

* reference: the layer equals the whole-MoE-FFN reference (`moe_ffn_reference`: fp32 softmax,
  top-k, renormalise, loop over experts) in outputs and in the gradients of the input, router and
  expert weights; in training mode the router gradient additionally carries exactly the
  load-balancing + z loss gradients; padding tokens leave the losses and statistics.
* triton: the same layer with the Triton expert kernels (TRITON_INTERPRET=1, fp32) equals the
  torch reference backend.
* model: a tiny-moe GPTModel puts JaiMoELayer in every MLP slot, exposes the documented checkpoint
  keys with global shapes.
"""
import os
import sys

import torch

from megatron_jai import parallel
from megatron_jai.presets import TINY_MOE

CFG = TINY_MOE.replace(hidden_size=16, moe_ffn_hidden_size=12)
TOL = dict(rtol=1e-5, atol=1e-5)


def make_layer(cfg=CFG, **overrides):
    from megatron.core.transformer.spec_utils import build_module

    from megatron_jai.moe.layer import moe_layer_spec

    layer = build_module(moe_layer_spec(cfg), config=cfg.transformer_config(**overrides))
    layer.set_layer_number(1)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # O(1) values so tolerances are meaningful
        layer.router.weight.normal_(0, 0.5, generator=g)
        layer.experts.weight_gate_up.normal_(0, 0.3, generator=g)
        layer.experts.weight_down.normal_(0, 0.3, generator=g)
    return layer


def check_reference():
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    from megatron_jai.moe.layer import collect_router_stats
    from megatron_jai.moe.reference import moe_ffn_reference
    from megatron_jai.moe.router import load_balancing_loss, z_loss

    layer = make_layer()
    seq, batch, h = 6, 2, CFG.hidden_size
    g = torch.Generator().manual_seed(4)
    x = torch.randn(seq, batch, h, generator=g)
    upstream = torch.randn(seq, batch, h, generator=g)

    def grads_of(fn):
        xx = x.clone().requires_grad_(True)
        params = [layer.router.weight, layer.experts.weight_gate_up, layer.experts.weight_down]
        for p in params:
            p.grad = None
        out = fn(xx)
        (out * upstream).sum().backward()
        return out.detach(), xx.grad, [p.grad.clone() for p in params]

    def reference(xx):
        tokens = xx.reshape(-1, h)
        logits = tokens @ layer.router.weight.t()
        return moe_ffn_reference(tokens, logits, layer.experts.weight_gate_up,
                                 layer.experts.weight_down, CFG.moe_top_k).view_as(xx)

    layer.eval()
    out_l, gx_l, gp_l = grads_of(lambda xx: layer(xx)[0])
    out_r, gx_r, gp_r = grads_of(reference)
    torch.testing.assert_close(out_l, out_r, **TOL)
    torch.testing.assert_close(gx_l, gx_r, **TOL)
    for a, b in zip(gp_l, gp_r):
        torch.testing.assert_close(a, b, **TOL)
    assert out_l.abs().max() > 0.1

    # Training mode: identical output; the router gradient gains d(aux + z)/dW.
    layer.train()
    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0))
    collect_router_stats(layer)
    out_t, gx_t, gp_t = grads_of(lambda xx: layer(xx)[0])
    torch.testing.assert_close(out_t, out_r, **TOL)
    torch.testing.assert_close(gp_t[1], gp_r[1], **TOL)
    w = layer.router.weight.detach().clone().requires_grad_(True)
    tokens = x.reshape(-1, h)
    logits = tokens @ w.t()
    probs = torch.softmax(logits, -1)
    ids = torch.topk(probs, CFG.moe_top_k).indices
    loss_terms = load_balancing_loss(probs, ids, CFG.moe_top_k, CFG.moe_aux_loss_coeff) \
        + z_loss(logits, CFG.moe_z_loss_coeff)
    loss_terms.backward()
    # The aux gradient is the difference of two router gradients ~2000x its size: fp32 rounding of
    # those (a few ulps, CPU-dependent summation order) bounds how closely it can match.
    atol = 8 * torch.finfo(torch.float32).eps * gp_r[0].abs().max().item()
    torch.testing.assert_close(gp_t[0] - gp_r[0], w.grad, rtol=1e-4, atol=atol)
    assert w.grad.abs().max() > 1e-4
    stats = collect_router_stats(layer)
    total = stats["moe/aux_loss"] + stats["moe/z_loss"]
    assert abs(total - loss_terms.item()) < 1e-5 * loss_terms.item(), (total, loss_terms.item())

    # Padding: masked tokens still get an output, but leave the aux loss and the statistics.
    padding = torch.zeros(batch, seq, dtype=torch.bool)
    padding[1, 3:] = True
    layer(x, padding_mask=padding)
    stats = collect_router_stats(layer)
    keep = ~padding.t().reshape(-1)
    expected = load_balancing_loss(probs.detach(), ids, CFG.moe_top_k, CFG.moe_aux_loss_coeff, keep)
    assert abs(stats["moe/aux_loss"] - expected.item()) < 1e-7, (stats["moe/aux_loss"], expected)
    print("OK reference: layer == moe_ffn_reference (outputs, grads), aux/z grads, padding", flush=True)


def check_triton():
    from megatron_jai.moe import functional

    assert functional.resolve_backend(None, torch.device("cpu")) == "triton", \
        "run with TRITON_INTERPRET=1"
    layer = make_layer()
    layer.eval()
    x = torch.randn(5, 2, CFG.hidden_size, generator=torch.Generator().manual_seed(5))
    results = {}
    for backend in ("triton", "reference"):
        os.environ["JAI_MOE_BACKEND"] = backend
        xx = x.clone().requires_grad_(True)
        layer.zero_grad(set_to_none=True)
        out, _ = layer(xx)
        out.square().sum().backward()
        results[backend] = [out.detach(), xx.grad, layer.experts.weight_gate_up.grad,
                            layer.experts.weight_down.grad, layer.router.weight.grad]
    for a, b in zip(results["triton"], results["reference"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    print("OK triton: layer on the Triton kernels (interpreter, fp32) == reference backend", flush=True)


def check_model():
    from megatron_jai.model import build_model
    from megatron_jai.moe.layer import JaiMoELayer

    model = build_model(TINY_MOE)
    mlps = [layer.mlp for layer in model.decoder.layers]
    assert len(mlps) == TINY_MOE.num_layers and all(isinstance(m, JaiMoELayer) for m in mlps)
    assert [m.layer_number for m in mlps] == list(range(1, TINY_MOE.num_layers + 1))
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import apply_factories

    sd = model.sharded_state_dict()
    apply_factories(sd)  # weight_gate_up: [gate; up] chunks of one global tensor
    shapes = {t.key: tuple(t.global_shape) for t in nested_values(sd) if ".mlp." in t.key}
    L, E, H, F = TINY_MOE.num_layers, TINY_MOE.num_experts, TINY_MOE.hidden_size, \
        TINY_MOE.expert_ffn_hidden_size
    expected = {
        "decoder.layers.mlp.router.weight": (L, E, H),
        "decoder.layers.mlp.experts.weight_gate_up": (L, E, 2 * F, H),
        "decoder.layers.mlp.experts.weight_down": (L, E, H, F),
    }
    assert shapes == expected, shapes
    assert all(not getattr(p, "allreduce", True) for n, p in model.named_parameters()
               if ".experts." in n)
    biased = build_model(TINY_MOE.replace(moe_expert_bias=True))
    keys = {t.key for t in biased.sharded_state_dict().values()}
    assert "decoder.layers.mlp.router.expert_bias" in keys
    from megatron.core.transformer.spec_utils import build_module

    from megatron_jai.moe.layer import moe_layer_spec

    # Megatron's selective recompute of "moe_act" turns on the kernels' SwiGLU recompute.
    assert not build_module(moe_layer_spec(TINY_MOE), config=TINY_MOE.transformer_config()) \
        .experts.recompute_activation
    sel_config = TINY_MOE.transformer_config()
    sel_config.recompute_granularity, sel_config.recompute_modules = "selective", ["moe_act"]
    assert build_module(moe_layer_spec(TINY_MOE), config=sel_config).experts.recompute_activation
    # bf16 (Megatron's Float16Module): routing stays fp32, the expert bias is not rounded.
    from megatron.core.transformer.module import Float16Module

    bf16_cfg = TINY_MOE.replace(num_layers=1, moe_expert_bias=True)
    tcfg = bf16_cfg.transformer_config(params_dtype=torch.bfloat16, bf16=True)
    bf16 = Float16Module(tcfg, build_model(bf16_cfg, tcfg))
    moe = bf16.module.decoder.layers[0].mlp
    assert moe.experts.weight_gate_up.dtype == torch.bfloat16 and moe.router.expert_bias.dtype == torch.float32
    tokens = torch.randint(0, TINY_MOE.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))
    loss = bf16(tokens, torch.arange(8).expand(2, 8), None, labels=tokens).float().mean()
    loss.backward()
    assert torch.isfinite(loss) and abs(loss.item() - 6.93) < 0.5, loss
    assert all(torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
               for p in (moe.router.weight, moe.experts.weight_gate_up, moe.experts.weight_down))
    print("OK model: MoE layers in every MLP slot, checkpoint keys and shapes, bf16", flush=True)


if __name__ == "__main__":
    parallel.initialize()
    for check in sys.argv[1:]:
        {"reference": check_reference, "triton": check_triton, "model": check_model}[check]()
    parallel.destroy()
