#!/usr/bin/env python
"""Benchmark generation: Megatron-Core's KV cache against recomputing the whole sequence.

  python tools/bench_generate.py [--model tiny|model_config.json|--load CKPT] [--new-tokens 256]
  torchrun --nproc_per_node 2 tools/bench_generate.py --model M --tp 2

Greedy decoding of --new-tokens tokens (never stopping early) after a random --prompt-tokens
prompt, with and without the cache, on a random-init model of the given architecture (or a
checkpoint). Prints a table (tokens/s, speed-up); --check X exits 1 when the speed-up is below X.
Numbers go to docs/PERFORMANCE.md; this is a benchmark, not a test.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_jai import cli  # noqa: E402


def bench_small():
    """Big enough that a forward pass costs more than the Python around it, small enough for a CPU."""
    from megatron_jai.presets import TINY

    return TINY.replace(name="small", hidden_size=256, num_attention_heads=8, num_query_groups=4,
                        ffn_hidden_size=704, vocab_size=32064, max_position_embeddings=4096)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", default="small",
                     help="'small' (hidden 256, 4 layers, Phi-3's 32,064-token vocabulary), a "
                          "preset name or a model_config.json (random init)")
    src.add_argument("--load", default=None, help="a Megatron checkpoint instead")
    p.add_argument("--new-tokens", type=int, default=256, help="tokens generated per run")
    p.add_argument("--prompt-tokens", type=int, default=32, help="random prompt length")
    p.add_argument("--repeats", type=int, default=1, help="runs per mode (the best counts)")
    cli.add_layout_arguments(p)
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None,
                   help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--check", type=float, default=None, metavar="X",
                   help="exit 1 if the cached loop is less than X times faster")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    import torch
    import torch.distributed as dist

    from megatron_jai import parallel
    from megatron_jai.presets import load_model_config
    from megatron_jai.inference.generation import SamplingParams, StopCondition, megatron_generate
    from megatron_jai.inference.lm import DTYPES, check_megatron_layout, default_dtype, megatron_model

    for name in ("new_tokens", "prompt_tokens", "repeats"):
        if getattr(args, name) < 1:
            raise cli.UserError(f"--{name.replace('_', '-')} must be >= 1")
    dtype = args.dtype or default_dtype()
    split = dict(first_stage_layers=args.first_stage_layers, last_stage_layers=args.last_stage_layers)
    reader = None
    if args.load:
        reader, _ = check_megatron_layout(args.load, args.tp, args.pp, args.ep, **split)
        cfg = reader.config
    else:
        try:
            cfg = bench_small() if args.model == "small" else load_model_config(args.model)
            cfg.check_layout(tp=args.tp, pp=args.pp, ep=args.ep, **split)
        except ValueError as err:
            raise cli.UserError(str(err)) from None
    total = args.prompt_tokens + args.new_tokens
    if total > cfg.max_position_embeddings:
        raise cli.UserError(f"prompt + new tokens = {total} exceed the model's context "
                            f"{cfg.max_position_embeddings}")
    model = megatron_model(cfg, args.tp, args.pp, args.ep, DTYPES[dtype], reader, **split)
    prompt = torch.randint(0, cfg.vocab_size, (args.prompt_tokens,),
                           generator=torch.Generator().manual_seed(0)).tolist()
    params = SamplingParams(max_new_tokens=args.new_tokens)
    never = StopCondition()
    rows = {}
    for use_cache in (True, False):
        best = None
        for _ in range(args.repeats):
            gen = megatron_generate(model, None, cfg.vocab_size, prompt, params, never,
                                    cfg.max_position_embeddings, use_cache=use_cache)
            best = gen if best is None or gen.seconds < best.seconds else best
        rows["kv cache" if use_cache else "no cache"] = best
    speedup = rows["kv cache"].tokens_per_second / rows["no cache"].tokens_per_second
    if dist.get_rank() == 0:
        device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
        print(f"{cfg.name}: {args.prompt_tokens} prompt + {args.new_tokens} new tokens, greedy, "
              f"{dtype}, TP={args.tp} PP={args.pp} EP={args.ep}, {device}")
        print(f"{'mode':10} {'seconds':>8} {'tokens/s':>9} {'speed-up':>9}")
        for name, gen in rows.items():
            ratio = gen.tokens_per_second / rows["no cache"].tokens_per_second
            print(f"{name:10} {gen.seconds:8.2f} {gen.tokens_per_second:9.1f} {ratio:8.1f}x")
        print(f"bench_generate: KV cache {speedup:.1f}x the uncached loop at {args.new_tokens} "
              f"new tokens", flush=True)
    parallel.destroy()
    if args.check is not None and speedup < args.check:
        return cli.EXIT_CHECK_FAILED
    return 0


if __name__ == "__main__":
    from megatron_jai.inference.lm import USER_ERRORS

    sys.exit(cli.run("bench_generate.py", main, user_errors=USER_ERRORS))
