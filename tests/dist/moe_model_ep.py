"""torchrun helper (2 ranks): a tiny MoE GPTModel under expert parallelism.

1. Resharding: a checkpoint saved at EP=2 loads at EP=1 (and one saved at EP=1 loads at EP=2) with
   identical logits; the stored expert tensors have their global shapes [L, E, ...]. A checkpoint
   saved at TP=2 (experts split along F) stores the TP=1 layout and loads at TP=1 and at EP=2.
2. Training: EP=2 (DP=2), Megatron-Core DDP + optimizer + pipeline schedule, Adam steps on a fixed
   batch per rank: finite, falling loss; the first steps' losses equal those of the same model at
   EP=1; router weights (data-parallel) stay identical on both ranks while the experts (one half
   per rank) differ; the load-balancing and z losses were active.
3. Sequence parallelism: a DUS model (MoE layers and a skip) at TP=2 with sequence parallelism
   gives the same loss and, after Megatron's finalize_model_grads, the same gradients of the
   replicated parameters (norms, routers) and of the (sliced) experts, and the same gradient norm,
   as TP=1; its checkpoint loads
   at TP=1 without sequence parallelism with identical logits.

Usage: moe_model_ep.py WORKDIR
"""
import os
import sys

import torch
import torch.distributed as dist

from megatron_jai import parallel
from megatron_jai.checkpoint.dist import load_checkpoint, save_checkpoint
from megatron_jai.presets import TINY_MOE
from megatron_jai.model import build_model
from megatron_jai.moe.layer import collect_router_stats

CFG = TINY_MOE.replace(num_layers=2)
BATCH, SEQ = 2, 16


def tokens_for(rank, length=SEQ):
    g = torch.Generator().manual_seed(1000 + rank)
    return torch.randint(0, CFG.vocab_size, (BATCH, length), generator=g)


def positions(tokens):
    return torch.arange(tokens.shape[1]).expand_as(tokens)


def logits_of(model, tokens):
    model.eval()
    with torch.no_grad():
        out = model(tokens, positions(tokens), None)
    model.train()
    return out


def build(ep, seed, tp=1, cfg=CFG, **overrides):
    parallel.initialize(tp=tp, ep=ep, seed=seed)
    torch.manual_seed(seed)
    return build_model(cfg, tp=tp, ep=ep, **overrides)


def full_logits_of(model, tokens):
    """Logits with the vocabulary gathered over TP."""
    from megatron.core import parallel_state

    out = logits_of(model, tokens)
    group = parallel_state.get_tensor_model_parallel_group()
    parts = [torch.empty_like(out) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, out.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


def check_resharding(workdir):
    tokens = tokens_for(0)  # the same tokens on both ranks
    m2 = build(ep=2, seed=1)
    rank = dist.get_rank()
    ref = logits_of(m2, tokens)
    root_ep2 = os.path.join(workdir, "saved_ep2")
    save_checkpoint(root_ep2, [m2], CFG, iteration=1)
    if rank == 0:
        from megatron_jai.checkpoint.stream import CheckpointReader

        reader = CheckpointReader(root_ep2)
        assert tuple(reader.shape("decoder.layers.mlp.experts.weight_gate_up")) == (
            2, 4, 2 * CFG.expert_ffn_hidden_size, CFG.hidden_size), reader.keys()
        assert tuple(reader.shape("decoder.layers.mlp.experts.weight_down")) == (
            2, 4, CFG.hidden_size, CFG.expert_ffn_hidden_size)
        assert tuple(reader.shape("decoder.layers.mlp.router.weight")) == (2, 4, CFG.hidden_size)
        # the experts of EP rank 1 are experts 2 and 3 of the global tensor
        stored = reader.read("decoder.layers.mlp.experts.weight_gate_up")
        assert torch.equal(stored[0, :2], m2.decoder.layers[0].mlp.experts.weight_gate_up.detach())

    m1 = build(ep=1, seed=2)  # different init: the checkpoint must overwrite everything
    assert not torch.allclose(logits_of(m1, tokens), ref)
    load_checkpoint(root_ep2, [m1])
    torch.testing.assert_close(logits_of(m1, tokens), ref, rtol=1e-5, atol=1e-5)
    root_ep1 = os.path.join(workdir, "saved_ep1")
    save_checkpoint(root_ep1, [m1], CFG, iteration=1)

    m2b = build(ep=2, seed=3)
    load_checkpoint(root_ep1, [m2b])
    torch.testing.assert_close(logits_of(m2b, tokens), ref, rtol=1e-5, atol=1e-5)
    print(f"OK resharding rank={rank} EP2->EP1->EP2 logits equal", flush=True)


def check_tp_resharding(workdir):
    """Experts split over TP (F axis): a checkpoint saved at TP=2 (EP=1) stores the same global
    [gate; up] layout as TP=1 and loads at TP=1 and at EP=2 with identical logits."""
    from megatron.core import parallel_state

    from megatron_jai.checkpoint.stream import CheckpointReader

    tokens = tokens_for(0)
    rank = dist.get_rank()
    m_tp2 = build(ep=1, seed=1, tp=2)
    experts = m_tp2.decoder.layers[0].mlp.experts
    assert experts.tp_size == 2 and experts.weight_down.shape[-1] == CFG.expert_ffn_hidden_size // 2
    ref = full_logits_of(m_tp2, tokens)
    # this layer's full expert weights, reassembled from the TP slices
    group = parallel_state.get_tensor_model_parallel_group()
    gu = [torch.empty_like(experts.weight_gate_up) for _ in range(2)]
    dn = [torch.empty_like(experts.weight_down) for _ in range(2)]
    dist.all_gather(gu, experts.weight_gate_up.detach(), group=group)
    dist.all_gather(dn, experts.weight_down.detach(), group=group)
    halves = [torch.chunk(g, 2, dim=1) for g in gu]
    full_gu = torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=1)
    full_dn = torch.cat(dn, dim=2)
    root = os.path.join(workdir, "saved_tp2")
    save_checkpoint(root, [m_tp2], CFG, iteration=1)
    if rank == 0:
        reader = CheckpointReader(root)
        stored_gu = reader.read("decoder.layers.mlp.experts.weight_gate_up")
        stored_dn = reader.read("decoder.layers.mlp.experts.weight_down")
        assert tuple(stored_gu.shape) == (2, 4, 2 * CFG.expert_ffn_hidden_size, CFG.hidden_size)
        assert tuple(stored_dn.shape) == (2, 4, CFG.hidden_size, CFG.expert_ffn_hidden_size)
        assert torch.equal(stored_gu[0], full_gu) and torch.equal(stored_dn[0], full_dn)

    m1 = build(ep=1, seed=2)
    assert not torch.allclose(logits_of(m1, tokens), ref)
    load_checkpoint(root, [m1])
    torch.testing.assert_close(logits_of(m1, tokens), ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(m1.decoder.layers[0].mlp.experts.weight_gate_up.detach(), full_gu)
    # CPU initialisation does not depend on TP: TP=1 with the same seed draws the same experts.
    m1_same_seed = build(ep=1, seed=1)
    assert torch.equal(m1_same_seed.decoder.layers[0].mlp.experts.weight_gate_up.detach(), full_gu)

    m_ep2 = build(ep=2, seed=3)
    load_checkpoint(root, [m_ep2])
    torch.testing.assert_close(logits_of(m_ep2, tokens), ref, rtol=1e-5, atol=1e-5)
    print(f"OK tp resharding rank={rank} TP2->TP1 and TP2->EP2 logits equal", flush=True)


def wrap_ddp(model):
    """Megatron-Core DDP with finalize_model_grads as the schedule's gradient finaliser."""
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )

    tcfg = model.config
    ddp = DistributedDataParallel(tcfg, DistributedDataParallelConfig(grad_reduce_in_fp32=True),
                                  model)
    tcfg.no_sync_func = ddp.no_sync
    tcfg.finalize_model_grads_func = finalize_model_grads
    return ddp


def forward_backward(ddp, tokens):
    """Gradients of the mean next-token loss on ``tokens`` [b, s + 1] (2 micro-batches of the same
    batch) through Megatron's schedule; returns the mean loss."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    inputs, labels = tokens[:, :-1], tokens[:, 1:]

    def forward_step(_it, m):
        out = m(inputs, positions(inputs), None, labels=labels)

        def loss_func(o):
            mean = o.float().mean()
            return mean, {"loss": mean.detach().clone()}

        return out, loss_func

    ddp.zero_grad_buffer()
    out = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=None, model=[ddp], num_microbatches=2,
        seq_length=inputs.shape[1], micro_batch_size=inputs.shape[0], forward_only=False)
    return torch.stack([o["loss"] for o in out]).mean()


def optimizer(ddp):
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    return get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=3e-3, params_dtype=torch.float32,
                                                  clip_grad=0.0),  # (Megatron clipping is CUDA-only)
                                  [ddp])


def grad_norm(ddp):
    """Megatron's global gradient norm of the reduced gradients (what clipping uses)."""
    opt = optimizer(ddp)
    opt.prepare_grads()  # main_grad -> grad, as step() does
    return torch.tensor(opt.get_grad_norm())


def train(ep, steps):
    """Adam steps through Megatron-Core DDP + optimizer + pipeline schedule at the given EP (DP=2),
    each data-parallel rank on its own fixed batch. Returns (model, per-step mean losses, the
    reduced gradients of layer 0's MoE parameters at step 1)."""
    model = build(ep=ep, seed=5)  # CPU initialisation does not depend on EP: the same model either way
    ddp = wrap_ddp(model)
    opt = optimizer(ddp)
    tokens = tokens_for(dist.get_rank())
    losses, first_grads = [], None
    for _ in range(steps):
        opt.zero_grad()
        loss = forward_backward(ddp, tokens)
        if first_grads is None:  # after DDP's reduction (finalize_model_grads)
            first_grads = {n.split("mlp.")[1]: p.main_grad.detach().clone()
                           for n, p in model.named_parameters() if "layers.0.mlp." in n}
        ok, grad_norm, _ = opt.step()
        assert ok and torch.isfinite(torch.tensor(grad_norm))
        dist.all_reduce(loss)
        losses.append(loss.item() / 2)
    return model, losses, first_grads


def check_training(steps=12, compared=4):
    rank = dist.get_rank()
    _, ep1_losses, ep1_grads = train(ep=1, steps=compared)
    model, losses, ep2_grads = train(ep=2, steps=steps)
    assert all(torch.isfinite(torch.tensor(losses))), losses
    assert losses[-1] < losses[0] - 1.0, f"loss did not fall: {losses}"
    # Same model, same data: EP=2 must train exactly like EP=1 (expert gradients reduced over the
    # expert-data-parallel group with the right scale, routing gradients through the all-to-all).
    torch.testing.assert_close(torch.tensor(losses[:compared]), torch.tensor(ep1_losses),
                               rtol=1e-5, atol=1e-5)
    # The reduced gradients themselves (Adam would hide a wrong scale): this rank's experts are
    # experts [2 * rank, 2 * rank + 2) of the EP=1 model; the router is replicated.
    assert set(ep2_grads) == {"router.weight", "experts.weight_gate_up", "experts.weight_down"}
    for name, grad in ep2_grads.items():
        ref = ep1_grads[name] if name.startswith("router") else ep1_grads[name][2 * rank:2 * rank + 2]
        torch.testing.assert_close(grad, ref, rtol=1e-4, atol=1e-6)
        assert grad.abs().max() > 0, name

    stats = collect_router_stats(model)
    assert stats["moe/aux_loss"] > 0 and stats["moe/z_loss"] > 0, stats
    router = model.decoder.layers[0].mlp.router.weight.detach().clone()
    experts = model.decoder.layers[0].mlp.experts.weight_gate_up.detach().clone()
    peers_router = [torch.empty_like(router) for _ in range(2)]
    peers_experts = [torch.empty_like(experts) for _ in range(2)]
    dist.all_gather(peers_router, router)
    dist.all_gather(peers_experts, experts)
    assert torch.equal(peers_router[0], peers_router[1]), "router replicas diverged"
    assert not torch.allclose(peers_experts[0], peers_experts[1]), "EP ranks hold the same experts"
    print(f"OK training rank={rank} loss {losses[0]:.3f} -> {losses[-1]:.3f} "
          f"(EP=1 == EP=2 for {compared} steps) aux={stats['moe/aux_loss']:.4f} "
          f"max_load={stats['moe/max_load']:.2f}", flush=True)


def check_sequence_parallel(workdir):
    from megatron_jai.config import SkipConnection

    cfg = CFG.replace(num_layers=3, skip_connections=(SkipConnection(0, 2, 0.7, 0.6),))
    tokens = tokens_for(0, SEQ + 1)  # the same batch on both ranks; SEQ divides over TP
    rank = dist.get_rank()

    def replicated(model):  # norms and routers: not split over TP
        return {n: p for n, p in model.named_parameters()
                if not getattr(p, "tensor_model_parallel", False) and ".experts." not in n}

    def replicated_grads(model):
        return {n: p.main_grad.clone() for n, p in replicated(model).items()}

    sp = build(ep=1, seed=1, tp=2, cfg=cfg, sequence_parallel=True)
    assert sp.config.sequence_parallel
    assert all(p.sequence_parallel for p in replicated(sp).values())
    root = os.path.join(workdir, "saved_tp2_sp")
    save_checkpoint(root, [sp], cfg, iteration=1)
    ref_logits = full_logits_of(sp, tokens[:, :-1])
    sp_ddp = wrap_ddp(sp)
    sp_loss = forward_backward(sp_ddp, tokens)
    sp_norm = grad_norm(sp_ddp)  # (while the TP=2 process groups exist)
    sp_grads = replicated_grads(sp)
    experts = sp.decoder.layers[0].mlp.experts
    sp_gu, sp_dn = experts.weight_gate_up.main_grad.clone(), experts.weight_down.main_grad.clone()

    tp1 = build(ep=1, seed=2, cfg=cfg)  # a different init: the checkpoint must overwrite it
    load_checkpoint(root, [tp1])
    torch.testing.assert_close(logits_of(tp1, tokens[:, :-1]), ref_logits, rtol=1e-5, atol=1e-5)
    tp1_ddp = wrap_ddp(tp1)
    tp1_loss = forward_backward(tp1_ddp, tokens)
    torch.testing.assert_close(sp_loss, tp1_loss, rtol=1e-6, atol=1e-6)
    # The gradient norm (clipping) counts every TP shard of the experts once.
    torch.testing.assert_close(sp_norm, grad_norm(tp1_ddp), rtol=1e-5, atol=0)
    tp1_grads = replicated_grads(tp1)
    assert set(sp_grads) == set(tp1_grads) and any("router" in n for n in sp_grads), sorted(sp_grads)
    for name, grad in sp_grads.items():
        torch.testing.assert_close(grad, tp1_grads[name], rtol=1e-4, atol=1e-6, msg=name)
        assert grad.abs().max() > 0, name
    ref_experts = tp1.decoder.layers[0].mlp.experts
    want_gu, want_dn = experts.local_slices(ref_experts.weight_gate_up.main_grad,
                                            ref_experts.weight_down.main_grad)
    torch.testing.assert_close(sp_gu, want_gu, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(sp_dn, want_dn, rtol=1e-4, atol=1e-6)
    print(f"OK sequence parallel rank={rank} TP2+SP == TP1 (loss {sp_loss.item():.4f}, "
          f"{len(sp_grads)} replicated grads, experts), SP checkpoint loads at TP1", flush=True)


def main():
    workdir = sys.argv[1]
    check_resharding(workdir)
    check_tp_resharding(workdir)
    check_sequence_parallel(workdir)
    check_training()
    parallel.destroy()


if __name__ == "__main__":
    main()
