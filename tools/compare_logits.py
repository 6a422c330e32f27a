#!/usr/bin/env python
"""Compare the logits of a Hugging Face model (Phi-3, Mixtral or a JAI export) and the Megatron-Core
checkpoint it came from or was exported from.

  torchrun --nproc_per_node N tools/compare_logits.py --hf-dir H --mcore-dir M --tp T --pp P --ep E \
      [--first-stage-layers F --last-stage-layers L --seq-len S --batch B --seed X --tol 1e-4]

The same random token ids go through transformers (fp32, eager attention, eval mode) and through the
Megatron-Core model (fp32, eval mode, built at TP/PP/EP, loaded from M). DUS skips blend with their
inference alphas on both sides. The last line printed is ``max_abs_logit_diff <value>``; the exit
status is 0 only when it is within --tol (1 otherwise, 2 for bad input).
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_jai import cli  # noqa: E402


_ARCH_FIELDS = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups",
                "expert_ffn_hidden_size", "vocab_size", "num_experts", "moe_top_k",
                "moe_normalize_topk", "moe_expert_bias", "skip_connections", "rotary_base",
                "rotary_interpolation_factor")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf-dir", required=True, help="Hugging Face directory (Phi-3, Mixtral, JAI)")
    p.add_argument("--mcore-dir", required=True, help="Megatron-Core checkpoint root")
    cli.add_layout_arguments(p)
    p.add_argument("--seq-len", type=int, default=32, help="tokens per sequence")
    p.add_argument("--batch", type=int, default=2, help="sequences")
    p.add_argument("--seed", type=int, default=0, help="seed of the random token ids")
    p.add_argument("--tol", type=float, default=1e-4, help="largest accepted absolute difference")
    p.add_argument("--hf-device", default=None, help="device of the HF model (default: same as Megatron)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    for name, value in (("--seq-len", args.seq_len), ("--batch", args.batch), ("--tp", args.tp),
                        ("--pp", args.pp), ("--ep", args.ep)):
        if value < 1:
            raise cli.UserError(f"{name} must be >= 1")
    from megatron_jai import parallel
    from megatron_jai.inference.compare import compare_logits
    from megatron_jai.checkpoint.convert import read_hf_config, validate_layout
    from megatron_jai.checkpoint.formats import ConversionError, model_config_from_hf
    from megatron_jai.checkpoint.stream import CheckpointReader

    hf_cfg = model_config_from_hf(read_hf_config(args.hf_dir))
    cfg = CheckpointReader(args.mcore_dir).config
    # Different architectures would only fail later, in one rank, while the others wait.
    differ = [f"{f} {getattr(hf_cfg, f)} vs {getattr(cfg, f)}" for f in _ARCH_FIELDS
              if getattr(hf_cfg, f) != getattr(cfg, f)]
    if differ:
        raise ConversionError(f"{args.hf_dir} and {args.mcore_dir} are different models (HF vs "
                              f"Megatron: {', '.join(differ)})")
    validate_layout(cfg, args.tp, args.pp, args.ep, args.first_stage_layers, args.last_stage_layers)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world % (args.tp * args.pp):
        raise ConversionError(f"{world} processes are not a multiple of TP*PP = {args.tp * args.pp}")
    if (world // args.pp) % args.ep:
        raise ConversionError(f"EP={args.ep} must divide the {world // args.pp} processes of a "
                              f"pipeline stage")
    if args.seq_len > cfg.max_position_embeddings:
        raise ConversionError(f"--seq-len {args.seq_len} exceeds max_position_embeddings "
                              f"{cfg.max_position_embeddings}")
    result = compare_logits(args.hf_dir, args.mcore_dir, tp=args.tp, pp=args.pp, seq_len=args.seq_len,
                            batch=args.batch, seed=args.seed, hf_device=args.hf_device, ep=args.ep,
                            first_stage_layers=args.first_stage_layers,
                            last_stage_layers=args.last_stage_layers)
    import torch.distributed as dist

    rank = dist.get_rank()
    parallel.destroy()
    ok = result.max_abs_diff <= args.tol
    if rank == 0:
        if cfg.moe_capacity_factor is not None:
            print(f"compare_logits: note: capacity factor {cfg.moe_capacity_factor} not applied "
                  f"(both models dropless)")
        print(f"logits {result.shape}: max |logit| {result.max_abs_logit:.4g}, argmax agreement "
              f"{result.argmax_agreement:.4f}, TP={args.tp} PP={args.pp} EP={args.ep}: "
              f"{'within' if ok else 'OUTSIDE'} tolerance {args.tol:g}")
        print(f"max_abs_logit_diff {result.max_abs_diff:.3e}", flush=True)
    return cli.EXIT_OK if ok else cli.EXIT_CHECK_FAILED


if __name__ == "__main__":
    sys.exit(cli.run("compare_logits.py", main))
