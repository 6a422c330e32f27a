"""torchrun (2 ranks) helper: trains with ``pretrain_jai.py``'s ``main`` in this process (one
torchrun start instead of two), then checks that the checkpoint it saved under an uneven PP=2 split
gives the same logits and loss when loaded back under that split and under PP=1.

Under the split, checks which global layers each stage built (Megatron's offsets, not an even share)
and, for a DUS model, that exactly the skips crossing the uneven boundary are carried.

Usage: train_uneven_pp_reload.py CKPT FIRST_STAGE_LAYERS PRETRAIN_FLAGS...
  (the flags must include --pp 2 --first-stage-layers FIRST_STAGE_LAYERS --save CKPT)
"""
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron_jai import parallel
from megatron_jai.checkpoint.dist import load_checkpoint
from megatron_jai.parallel import pipeline_stage_layers
from megatron_jai.presets import load_model_config
from megatron_jai.model import build_model
from megatron_jai.parallel import crossing_skips

BATCH, SEQ, MICRO = 2, 16, 2
_destroy_all = parallel.destroy


def _destroy_model_parallel():
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()


def forward_logits(model, vocab_size):
    """Inference-mode logits of MICRO fixed micro-batches (on the last stage; [] elsewhere) and
    their mean next-token loss."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, vocab_size, (BATCH, SEQ), generator=gen) for _ in range(MICRO)]
    positions = torch.arange(SEQ).expand(BATCH, SEQ)
    it, logits = iter(batches), []

    def forward_step(data_iterator, model):
        tokens = next(data_iterator)
        out = model(tokens, positions, None)

        def loss_func(o):
            logits.append((o.detach().clone(), tokens))
            zero = o.float().sum() * 0
            return zero, {}

        return out, loss_func

    model.eval()
    with torch.no_grad():
        get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=it, model=[model],
            num_microbatches=MICRO, seq_length=SEQ, micro_batch_size=BATCH, forward_only=True)
    if not logits:
        return None, None
    stacked = torch.stack([o for o, _ in logits])
    loss = sum(F.cross_entropy(o[:, :-1, :vocab_size].reshape(-1, vocab_size).float(),
                               t[:, 1:].reshape(-1)) for o, t in logits) / len(logits)
    return stacked, float(loss)


def main(ckpt, first):
    cfg = load_model_config(ckpt)
    sizes = pipeline_stage_layers(cfg.num_layers, 2, first)
    # The uneven PP=2 split the run was trained with.
    parallel.initialize(1, 2, seed=3)
    from megatron.core import parallel_state

    rank = dist.get_rank()
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    model = build_model(cfg, pp=2, first_stage_layers=first)
    layers = [layer.layer_number - 1 for layer in model.decoder.layers]
    start = sum(sizes[:pp_rank])
    assert layers == list(range(start, start + sizes[pp_rank])), (pp_rank, layers, sizes)
    crossing = crossing_skips(cfg.skip_connections, [first])
    if cfg.skip_connections:
        carried = sorted({s.source for s in crossing})
        side = model.decoder._send_sources if pp_rank == 0 else model.decoder._recv_sources
        assert side == carried, (pp_rank, side, carried)
        assert model.config.variable_seq_lengths == bool(crossing)
    load_checkpoint(ckpt, [model])
    pp_logits, pp_loss = forward_logits(model, cfg.vocab_size)

    # The same checkpoint at PP=1 (two data-parallel replicas).
    parallel.initialize(1, 1, seed=3)
    ref = build_model(cfg)
    load_checkpoint(ckpt, [ref])
    ref_logits, ref_loss = forward_logits(ref, cfg.vocab_size)
    if pp_logits is not None:
        diff = (pp_logits - ref_logits).abs().max().item()
        assert diff < 1e-5, f"logits differ by {diff}"
        assert abs(pp_loss - ref_loss) < 1e-6, (pp_loss, ref_loss)
        print(f"OK rank={rank} stage_layers={layers} carried={len(crossing)} "
              f"loss={pp_loss:.6f} ref_loss={ref_loss:.6f} max_logit_diff={diff:.1e}", flush=True)
    else:
        print(f"OK rank={rank} stage_layers={layers} carried={len(crossing)}", flush=True)
    parallel.destroy()


if __name__ == "__main__":
    import pretrain_jai

    # pretrain_jai ends by tearing down the process group; keep it for the reload checks.
    parallel.destroy = _destroy_model_parallel
    rc = pretrain_jai.main(sys.argv[3:])
    assert rc == 0, f"pretrain_jai.py exited with {rc}"
    parallel.destroy = _destroy_all
    main(sys.argv[1], int(sys.argv[2]))
