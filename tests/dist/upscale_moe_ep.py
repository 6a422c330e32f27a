"""torchrun (2 ranks) helper: an MoE checkpoint upcycled from one dense checkpoint (identical
experts, normalised top-k weights) gives the dense model's logits under expert parallelism EP=2.

Usage: upscale_moe_ep.py DENSE_CKPT MOE_CKPT
"""
import sys

import torch
import torch.distributed as dist

from megatron_jai import parallel
from megatron_jai.checkpoint.dist import load_checkpoint
from megatron_jai.presets import load_model_config
from megatron_jai.model import build_model


def logits(ckpt, ep, tokens):
    cfg = load_model_config(ckpt)
    model = build_model(cfg, ep=ep)
    load_checkpoint(ckpt, [model])
    model.eval()
    with torch.no_grad():
        return cfg, model(tokens, torch.arange(tokens.shape[1]).expand_as(tokens), None)


def main(dense_ckpt, moe_ckpt):
    parallel.initialize(1, 1, ep=2, seed=5)
    rank = dist.get_rank()
    # Different tokens on each rank, so the all-to-all really moves tokens between experts.
    gen = torch.Generator().manual_seed(100 + rank)
    dense_cfg = load_model_config(dense_ckpt)
    tokens = torch.randint(0, dense_cfg.vocab_size, (2, 16), generator=gen)
    _, dense = logits(dense_ckpt, 1, tokens)
    moe_cfg, moe = logits(moe_ckpt, 2, tokens)
    assert moe_cfg.num_experts == 4 and not dense_cfg.is_moe
    from megatron_jai.moe.layer import JaiMoELayer

    layer = next(m for m in build_model(moe_cfg, ep=2).modules() if isinstance(m, JaiMoELayer))
    assert layer.experts.num_local_experts == 2, "EP=2 must split the 4 experts"
    err = (moe - dense).abs().max().item()
    assert err < 1e-4, f"rank {rank}: upcycled logits differ from dense by {err}"
    print(f"OK rank={rank} max_abs_diff={err:.2e}", flush=True)
    parallel.destroy()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
