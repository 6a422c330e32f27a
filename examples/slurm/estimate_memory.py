#!/usr/bin/env python
"""Per-GPU memory estimate for a TP/PP/EP/DP layout (arithmetic, see docs/scale_out.md).

  python examples/slurm/estimate_memory.py --model jai-75b --nodes 8 --tp 2 --pp 8 --ep 4 \
      --seq-length 4096 --recompute full
  python examples/slurm/estimate_memory.py --model jai-75b --nodes 8 --compare
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

# Layouts worth comparing for 64 layers / 4 experts on 8-GPU nodes: (TP, PP, EP).
CANDIDATES = [(1, 8, 4), (2, 4, 4), (2, 8, 4), (4, 4, 2), (4, 8, 2), (8, 4, 1), (8, 8, 1)]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="jai-75b", help="preset, model_config.json or checkpoint")
    p.add_argument("--nodes", type=int, default=8)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--gpu-memory-gib", type=float, default=80.0, help="H100 SXM: 80")
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--pp", type=int, default=8)
    p.add_argument("--ep", type=int, default=4)
    p.add_argument("--seq-length", type=int, default=4096)
    p.add_argument("--micro-batch-size", type=int, default=1)
    p.add_argument("--recompute", choices=["none", "selective", "full"], default="none",
                   help="selective = rerun the MLP/MoE block in backward (recompute_modules moe)")
    p.add_argument("--no-distributed-optimizer", dest="distributed_optimizer",
                   action="store_false")
    p.add_argument("--compare", action="store_true",
                   help="a table of candidate layouts, with and without recompute")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from megatron_jai.presets import load_model_config
    from megatron_jai.training.memory_estimate import GiB, estimate

    try:
        cfg = load_model_config(args.model)
        world = args.nodes * args.gpus_per_node
        kw = dict(seq_length=args.seq_length, micro_batch_size=args.micro_batch_size,
                  distributed_optimizer=args.distributed_optimizer)
        if args.compare:
            print(f"{cfg.name} on {args.nodes} x {args.gpus_per_node} GPUs, seq {args.seq_length}, "
                  f"micro-batch {args.micro_batch_size} (GiB per GPU; budget "
                  f"{args.gpu_memory_gib:g})")
            print("| TP | PP | EP | DP | EDP | params/GPU | states | total, no recompute | "
                  "total, selective (MoE) | total, full recompute |")
            print("|---|---|---|---|---|---|---|---|---|---|")
            for tp, pp, ep in CANDIDATES:
                try:
                    a, b, c = (estimate(cfg, world, tp, pp, ep, recompute=r, **kw)
                               for r in ("none", "selective", "full"))
                except ValueError as err:
                    print(f"| {tp} | {pp} | {ep} | - | - | not buildable: {err} ||||")
                    continue
                states = (a.weights + a.grads + a.optimizer) / GiB
                print(f"| {tp} | {pp} | {ep} | {a.dp} | {a.edp} | {a.params / 1e9:.2f} B | "
                      f"{states:.1f} | {a.total / GiB:.1f} | {b.total / GiB:.1f} | "
                      f"{c.total / GiB:.1f} |")
            return 0
        est = estimate(cfg, world, args.tp, args.pp, args.ep, recompute=args.recompute, **kw)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"{cfg.name}: TP={args.tp} PP={args.pp} EP={args.ep} DP={est.dp} on {world} GPUs, "
          f"seq {args.seq_length}, micro-batch {args.micro_batch_size}, recompute {args.recompute}")
    for name, value in est.rows():
        print(f"  {name:<48} {value}")
    fits = est.total <= args.gpu_memory_gib * GiB
    print(f"estimated {est.total / GiB:.1f} GiB per GPU: "
          f"{'fits' if fits else 'does NOT fit'} in {args.gpu_memory_gib:g} GiB")
    return 0 if fits else 2


if __name__ == "__main__":
    sys.exit(main())
