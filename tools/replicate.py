#!/usr/bin/env python
"""The JAI recipe, whole, from a base model to an aligned export, with controls and a report.

A small dense English model (its own ~8K BPE with Phi-3's chat format) stands in for Phi-3-medium.
The chain drives the project's own tools: base pretraining and HF export; from that HF directory,
the Thai tokenizer extension (about 2x the base vocabulary), vocab surgery, DUS.v2 (JAI-1's layout
on 10 layers: 10 -> 16), English recovery with snapshots, MoE upcycling (4 experts, top-2, from
the snapshots), Thai injection (27%), context extension (4x the sequence, new RoPE base); the
controls (a) the vocab-surgery model and (b) the JAI architecture from random init on the same
phases, 2 seeds for the pretraining arms; SFT A (Thai-heavy), SFT B (English-heavy), a 1:1 merge,
DPO; every stage's model exported to Hugging Face and evaluated with tools/evaluate.py.

  python tools/replicate.py --scale smoke --out runs/replication-smoke   # ~3 minutes
  python tools/replicate.py --scale small --out runs/replication-small   # ~75 minutes, 2 CPU cores

A rerun with the same --out continues: finished stages are kept. Writes DIR/report.json (every
number: checks, hypotheses, per-model results), DIR/report.md (the tables), DIR/plots/*.png and
DIR/final_hf/ (the DPO model). Exit status 1 when a function-preservation check fails. Each stage's
tool output goes to DIR/logs/<stage>.log. See docs/replication.md.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_jai import cli  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    from megatron_jai.replication.scales import SCALES

    p = argparse.ArgumentParser(description=__doc__, formatter_class=cli.HelpFormatter)
    p.add_argument("--scale", choices=sorted(SCALES), required=True,
                   help="smoke: the chain in about 3 minutes (a test); small: the published run")
    p.add_argument("--out", required=True, help="run directory (a rerun continues it)")
    p.add_argument("--seed", type=int, default=1,
                   help="seed of the first run of each arm (the second seed is SEED+1)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (the models are small: more threads only pay on an idle "
                        "machine, and cost many times their gain on a busy one)")
    return p


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.threads < 1:
        raise cli.UserError(f"--threads must be >= 1, got {args.threads}")
    from megatron_jai.replication import replicate

    return replicate(args.scale, args.out, args.seed, args.threads,
                     command="python tools/replicate.py " + " ".join(argv))


if __name__ == "__main__":
    sys.exit(cli.run("replicate.py", main))
