"""torchrun (2 ranks) helper: a DUS checkpoint gives the same loss (training and inference alphas),
and the same gradients, under PP=2 as under PP=1, including skips that cross the stage boundary,
with and without full activation recompute.

Usage: upscale_dus_pp.py SRC_CKPT WORK_DIR
"""
import sys

import torch
import torch.distributed as dist

from megatron_jai import parallel
from megatron_jai.checkpoint.dist import load_checkpoint, save_checkpoint
from megatron_jai.presets import load_model_config
from megatron_jai.model import build_model
from megatron_jai.parallel import crossing_skips

BATCH, SEQ, MICRO = 2, 16, 2


def global_named_grads(model):
    out = {}
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        if name.startswith("decoder.layers."):
            local = int(name.split(".")[2])
            rest = name.split(".", 3)[3]
            name = f"decoder.layers.{model.decoder.layers[local].layer_number - 1}.{rest}"
        out[name] = p.grad.detach().clone()
    return out


def compare_grads(grads, ref_grads):
    """Worst relative difference; fails on any gradient that differs, or none on this stage."""
    assert grads, "no gradients on this stage"
    worst = 0.0
    for name, g in grads.items():
        r = ref_grads[name]
        err = (g - r).abs().max().item() / (r.abs().max().item() + 1e-12)
        worst = max(worst, err)
        assert err < 1e-4, f"gradient of {name} differs (rel {err:.2e})"
    return worst


def run(model, forward_only, vocab_size):
    from megatron.core.pipeline_parallel import get_forward_backward_func

    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, vocab_size, (BATCH, SEQ), generator=gen) for _ in range(MICRO)]
    positions = torch.arange(SEQ).expand(BATCH, SEQ)
    it = iter(batches)

    def forward_step(data_iterator, model):
        tokens = next(data_iterator)
        out = model(tokens, positions, None, labels=tokens)

        def loss_func(o):
            mean = o.float().mean()
            return mean, {"loss": mean.detach().clone()}

        return out, loss_func

    model.train(not forward_only)
    losses = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=it, model=[model], num_microbatches=MICRO,
        seq_length=SEQ, micro_batch_size=BATCH, forward_only=forward_only)
    return [float(e["loss"]) for e in losses]


def main(src, ckpt):
    cfg = load_model_config(src)
    # Phase 1: PP=1 (two data-parallel replicas on the same data), reference numbers + checkpoint.
    parallel.initialize(1, 1, seed=7)
    rank = dist.get_rank()
    ref = build_model(cfg)
    from megatron_jai.model.dus_block import DusTransformerBlock

    assert isinstance(ref.decoder, DusTransformerBlock)
    load_checkpoint(src, [ref])
    ref_train = run(ref, forward_only=False, vocab_size=cfg.vocab_size)
    ref_grads = global_named_grads(ref)
    ref_eval = run(ref, forward_only=True, vocab_size=cfg.vocab_size)
    assert abs(ref_train[0] - ref_eval[0]) > 1e-6, "train and inference alphas gave the same loss"
    save_checkpoint(ckpt, [ref], cfg, iteration=0)

    # Phase 2: PP=2 from the checkpoint.
    parallel.initialize(1, 2, seed=7)
    from megatron.core import parallel_state

    model = build_model(cfg, pp=2)
    crossing = crossing_skips(cfg.skip_connections, [cfg.num_layers // 2])
    assert model.config.variable_seq_lengths == bool(crossing), "shape exchange iff skips cross"
    load_checkpoint(ckpt, [model])
    train = run(model, forward_only=False, vocab_size=cfg.vocab_size)
    grads = global_named_grads(model)
    evaluation = run(model, forward_only=True, vocab_size=cfg.vocab_size)
    if parallel_state.is_pipeline_last_stage():
        assert len(train) == MICRO and len(evaluation) == MICRO
        for a, b in zip(train + evaluation, ref_train + ref_eval):
            assert abs(a - b) < 1e-5, (train, evaluation, ref_train, ref_eval)
    worst = compare_grads(grads, ref_grads)

    # Full activation recompute (switched on the shared config, as pretrain_jai.py does per phase):
    # same losses and gradients, with skip states carried across the stage boundary.
    for p in model.parameters():
        p.grad = None
    c = model.config
    c.recompute_granularity, c.recompute_method, c.recompute_num_layers = "full", "uniform", 1
    from megatron.core import tensor_parallel

    checkpoint, chunks = tensor_parallel.checkpoint, []
    tensor_parallel.checkpoint = lambda *a: chunks.append(1) or checkpoint(*a)
    recompute_train = run(model, forward_only=False, vocab_size=cfg.vocab_size)
    tensor_parallel.checkpoint = checkpoint
    c.recompute_granularity = c.recompute_method = c.recompute_num_layers = None
    assert len(chunks) == MICRO * len(model.decoder.layers), chunks  # one checkpoint per layer
    if parallel_state.is_pipeline_last_stage():
        for a, b in zip(recompute_train, ref_train):
            assert abs(a - b) < 1e-5, (recompute_train, ref_train)
    recompute_worst = compare_grads(global_named_grads(model), ref_grads)
    layers = [l.layer_number - 1 for l in model.decoder.layers]
    print(f"OK rank={rank} crossing={len(crossing)} stage_layers={layers} "
          f"train={train} eval={evaluation} grads={len(grads)} worst_rel_err={worst:.1e} "
          f"recompute=full worst_rel_err={recompute_worst:.1e}", flush=True)
    if crossing:  # interleaved (virtual) pipeline chunks cannot carry them: refused at build time
        from megatron_jai.model.build import JaiGPTModel

        parallel_state.destroy_model_parallel()
        parallel_state.initialize_model_parallel(pipeline_model_parallel_size=2,
                                                 virtual_pipeline_model_parallel_size=2)
        tc = cfg.transformer_config(pp=2, virtual_pipeline_model_parallel_size=2)
        try:
            JaiGPTModel(cfg, tc, pre_process=rank == 0, post_process=False, vp_stage=0)
        except ValueError as e:
            assert "virtual-pipeline chunk" in str(e), e
        else:
            raise AssertionError("a virtual-pipeline layout with crossing skips was accepted")
    parallel.destroy()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
