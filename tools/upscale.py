#!/usr/bin/env python
"""Checkpoint surgery for upscaling a dense base model the JAI-1 way.

Subcommands (``tools/upscale.py SUB --help`` for each):

  vocab    embedding surgery for an extended tokenizer (new rows = mean of base-piece rows)
  dus      DUS.v2 depth up-scaling: copy layers along a plan, add long-range skips
  moe      MoE upcycling: every dense FFN becomes E experts (from 1..E checkpoints)
  recipe   the whole chain (HF Phi-3 -> convert -> tokenizer -> vocab -> DUS -> MoE) in one command

The logic lives in ``megatron_jai.upscale``; see docs/upscaling.md.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_jai import cli  # noqa: E402
from megatron_jai.checkpoint.convert import peak_rss_bytes  # noqa: E402
from megatron_jai.upscale.recipe import human_count  # noqa: E402


def _pp_hint(cfg) -> str:
    """Which pipeline splits keep the skips stage-local (crossing ones are carried between stages
    with the activations, which costs extra P2P traffic), with the pretrain_jai.py flags of an
    uneven split that avoids the crossing."""
    from megatron_jai.parallel import (crossing_skips, pipeline_flags, stage_boundaries,
                                       stage_local_layouts)

    if not cfg.skip_connections:
        return ""
    hints = []
    for pp in (2, 4, 8):
        even = stage_boundaries(cfg.num_layers, pp)
        crossing = crossing_skips(cfg.skip_connections, even) if even is not None else None
        if crossing == []:
            hints.append(f"PP={pp} stage-local")
            continue
        hint = f"PP={pp} {len(crossing)} carried" if crossing else f"PP={pp}"
        for first, last in stage_local_layouts(cfg.num_layers, cfg.skip_connections, pp)[:1]:
            bounds = [0] + stage_boundaries(cfg.num_layers, pp, first, last) + [cfg.num_layers]
            if max(b - a for a, b in zip(bounds, bounds[1:])) <= 1.5 * cfg.num_layers / pp:
                hint += f" (stage-local with first/last stage {first}/{last} layers: " \
                        f"{pipeline_flags(pp, first, last)})"
        if hint != f"PP={pp}":  # an uneven-only PP size is worth naming only when it is local
            hints.append(hint)
    return "; skips under " + ", ".join(hints) if hints else ""


# ---- dus ---------------------------------------------------------------------------------------
def add_dus_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--in", dest="src", required=True, help="input checkpoint root (ours)")
    p.add_argument("--plan", default="phi3-medium-jai",
                   help="plan name (phi3-medium-jai) or a YAML/JSON plan file (default: %(default)s)")
    p.add_argument("--out", required=True, help="output checkpoint root")
    p.add_argument("--name", help="model name in the new config (default: <base>-dus<layers>)")
    p.add_argument("--force", action="store_true", help="replace an existing output")


def run_dus(args) -> int:
    from megatron_jai.upscale.dus import depth_upscale
    from megatron_jai.upscale.plan import load_plan

    t0 = time.time()
    plan = load_plan(args.plan)
    print(plan.describe(), flush=True)
    s = depth_upscale(args.src, args.out, plan, name=args.name, force=args.force)
    print(f"dus: {s['base_layers']} -> {s['layers']} layers, {s['skips']} skips, parameters "
          f"{human_count(s['params_total'])} total / {human_count(s['params_active'])} active, wrote "
          f"{s['out']} ({s['bytes'] / 2**20:.1f} MiB) in {time.time() - t0:.1f}s, peak RSS "
          f"{peak_rss_bytes() / 2**20:.0f} MiB{_pp_hint(s['config'])}")
    return 0


# ---- moe ---------------------------------------------------------------------------------------
def add_moe_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--in", dest="src", nargs="+", required=True,
                   help="1..E dense checkpoints; expert i comes from input i mod n")
    p.add_argument("--experts", type=int, default=4, help="experts per layer (default: %(default)s)")
    p.add_argument("--top-k", type=int, default=2, help="experts per token (default: %(default)s)")
    p.add_argument("--out", required=True, help="output checkpoint root")
    p.add_argument("--noise-std", type=float, default=0.0,
                   help="with one input: Gaussian noise added to experts 1..E-1 (default: 0)")
    p.add_argument("--router-std", type=float, default=None,
                   help="router weight init std (default: per layer, router logits of std 0.01: "
                        "near-uniform probabilities, tokens spread over the experts); 0 = exactly "
                        "uniform probabilities, but then every token picks the same k experts")
    p.add_argument("--shared-from", choices=("first", "last", "mean"), default="first",
                   help="attention, norms and embeddings from the first input, the last (the "
                        "newest of chronological snapshots: --in S0 S2K S4K S6K --shared-from "
                        "last continues from S6K, as JAI-1) or their mean (default: first)")
    p.add_argument("--average-shared", action="store_true", help="the same as --shared-from mean")
    p.add_argument("--seed", type=int, default=0, help="seed for noise and router init")
    p.add_argument("--name", help="model name in the new config (default: <base>-moe<E>)")
    p.add_argument("--force", action="store_true", help="replace an existing output")


def run_moe(args) -> int:
    from megatron_jai.upscale.upcycle import upcycle

    t0 = time.time()
    s = upcycle(args.src, args.out, args.experts, args.top_k, noise_std=args.noise_std,
                router_std=args.router_std, average_shared=args.average_shared,
                shared_from=args.shared_from, seed=args.seed,
                name=args.name, force=args.force)
    print(f"moe: {s['layers']} layers x {s['experts']} experts (top-{s['top_k']}) from "
          f"{s['inputs']} checkpoint(s), parameters {human_count(s['params_total'])} total / "
          f"{human_count(s['params_active'])} active, wrote {s['out']} ({s['bytes'] / 2**20:.1f} MiB) "
          f"in {time.time() - t0:.1f}s, peak RSS {peak_rss_bytes() / 2**20:.0f} MiB")
    return 0


# ---- main --------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from megatron_jai.upscale import vocab

    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="SUBCOMMAND")
    p = sub.add_parser("vocab", help="embedding surgery for an extended tokenizer")
    vocab.add_arguments(p)
    p.set_defaults(func=vocab.main)
    p = sub.add_parser("dus", help="DUS.v2 depth up-scaling along a layer plan")
    add_dus_arguments(p)
    p.set_defaults(func=run_dus)
    p = sub.add_parser("moe", help="MoE upcycling of dense checkpoints")
    add_moe_arguments(p)
    p.set_defaults(func=run_moe)
    from megatron_jai.upscale import recipe

    p = sub.add_parser("recipe", help="the whole upscaling chain in one command")
    recipe.add_arguments(p)
    p.set_defaults(func=recipe.main)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(cli.run("upscale.py", main))
