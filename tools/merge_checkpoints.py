#!/usr/bin/env python
"""Merge checkpoints of one architecture (ours, saved at any TP/PP/EP) into a new checkpoint.

  python tools/merge_checkpoints.py --inputs A B --out M                       # linear 1:1 (mean)
  python tools/merge_checkpoints.py --method linear --inputs A B C --weights 2 1 1 --out M
  python tools/merge_checkpoints.py --method slerp --inputs A B --t 0.3 --out M
  python tools/merge_checkpoints.py --method task_arithmetic --base BASE --inputs A B --lambda 0.8 --out M
  python tools/merge_checkpoints.py --method ties --base BASE --inputs A B --density 0.5 --out M

An input is a checkpoint root (its latest iteration) or one iteration directory, ROOT/iter_0001000.
The output is a model-only iteration-0 checkpoint root (no optimizer state) with the inputs'
tokenizer: `pretrain_jai.py --init-from M` trains it, `convert_checkpoint.py mcore-to-hf` exports it.
Streams one layer of one tensor at a time; see docs/checkpoints.md (Merging).
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_jai import cli  # noqa: E402
from megatron_jai.checkpoint.merge import METHODS  # noqa: E402

PROG = "merge_checkpoints.py"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", default="linear", choices=METHODS, help="merge method (default: %(default)s)")
    p.add_argument("--inputs", nargs="+", required=True, metavar="CKPT",
                   help="checkpoints to merge: roots (latest iteration) or ROOT/iter_N directories")
    p.add_argument("--out", required=True, help="output checkpoint root")
    p.add_argument("--weights", nargs="+", type=float, default=None, metavar="W",
                   help="one weight per input (default: 1 each; linear divides by their sum)")
    p.add_argument("--base", default=None,
                   help="task_arithmetic, ties: the model the inputs were fine-tuned from")
    p.add_argument("--t", type=float, default=None,
                   help="slerp: 0 gives the first input, 1 the second (default: 0.5)")
    p.add_argument("--density", type=float, default=None,
                   help="ties: fraction of each task vector's largest magnitudes kept (default: 1)")
    p.add_argument("--lambda", dest="lam", type=float, default=None,
                   help="task_arithmetic, ties: scale of the merged task vector (default: 1)")
    p.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=None,
                   help="divide by the sum of the weights (default: on for linear and ties, off "
                        "for task_arithmetic, as in mergekit)")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default=None,
                   help="output dtype (default: the inputs'); the merge computes in fp32")
    p.add_argument("--name", default=None, help="model name in model_config.json (default: the "
                                                "first input's)")
    p.add_argument("--force", action="store_true",
                   help="replace --out (the old one is removed only once the new one is complete)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from megatron_jai.checkpoint.convert import DTYPES
    from megatron_jai.checkpoint.merge import merge_checkpoints, summary_line

    summary = merge_checkpoints(
        args.method, args.inputs, args.out, weights=args.weights, base=args.base, t=args.t,
        density=args.density, lam=args.lam, normalize=args.normalize,
        dtype=DTYPES[args.dtype] if args.dtype else None, name=args.name, force=args.force,
        progress=not args.no_progress)
    print(summary_line(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(PROG, main))
