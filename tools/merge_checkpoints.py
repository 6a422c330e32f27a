#!/usr/bin/env python
"""Merge checkpoints of one architecture (ours, saved at any TP/PP/EP) into a new checkpoint, as
mergekit merges their Hugging Face exports.

  python tools/merge_checkpoints.py --inputs A B --out M                       # linear 1:1 (mean)
  python tools/merge_checkpoints.py --config merge.yml --out M                 # a mergekit config
  python tools/merge_checkpoints.py --method linear --inputs A B C --weights 2 1 1 --out M
  python tools/merge_checkpoints.py --method slerp --inputs A B --t 0.3 --out M
  python tools/merge_checkpoints.py --method task_arithmetic --base BASE --inputs A B --lambda 0.8 --out M
  python tools/merge_checkpoints.py --method ties --base BASE --inputs A B --density 0.5 --out M
  python tools/merge_checkpoints.py --method dare_ties --base BASE --inputs A B --density 0.3 --seed 1 --out M
  python tools/merge_checkpoints.py --method model_stock --base BASE --inputs A B C --out M

A mergekit config names our checkpoints as its models (models, base_model, merge_method,
parameters with per-model weight/density/gamma, filters and gradients, dtype). An input is a
checkpoint root (its latest iteration) or one iteration directory, ROOT/iter_0001000. The output is a
model-only iteration-0 checkpoint root (no optimizer state) with the inputs' tokenizer:
`pretrain_jai.py --init-from M` trains it, `convert_checkpoint.py mcore-to-hf` exports it. Streams
one layer of one tensor at a time; see docs/checkpoints.md (Merging).
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_jai import cli  # noqa: E402
from megatron_jai.checkpoint.merge import METHODS  # noqa: E402

PROG = "merge_checkpoints.py"
# flag -> the mergekit parameter it sets for the whole merge
SHARED_FLAGS = {"t": "t", "density": "density", "gamma": "gamma", "lam": "lambda",
                "normalize": "normalize", "rescale": "rescale"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=cli.HelpFormatter)
    p.add_argument("--config", default=None, metavar="YML",
                   help="a mergekit YAML config (instead of --method, --inputs and the parameters)")
    p.add_argument("--method", default=None, choices=list(METHODS),
                   help="merge method (default: linear)")
    p.add_argument("--inputs", nargs="+", default=None, metavar="CKPT",
                   help="checkpoints to merge: roots (latest iteration) or ROOT/iter_N directories")
    p.add_argument("--out", required=True, help="output checkpoint root")
    p.add_argument("--weights", nargs="+", type=float, default=None, metavar="W",
                   help="one weight per input (default: 1 each)")
    p.add_argument("--base", default=None,
                   help="the model the inputs were fine-tuned from (task_arithmetic, ties, dare_*, "
                        "breadcrumbs*, model_stock)")
    p.add_argument("--t", type=float, default=None,
                   help="slerp: 0 gives the first input, 1 the second (default: 0.5)")
    p.add_argument("--density", type=float, default=None,
                   help="ties, dare_*, breadcrumbs*: share of each task vector kept (default: 1)")
    p.add_argument("--gamma", type=float, default=None,
                   help="breadcrumbs*: share of largest magnitudes dropped (default: 0.01)")
    p.add_argument("--lambda", dest="lam", type=float, default=None,
                   help="task vector methods: scale of the merged task vector (default: 1)")
    p.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=None,
                   help="divide by the sum of the weights (default: mergekit's, on for linear and "
                        "ties)")
    p.add_argument("--rescale", action=argparse.BooleanOptionalAction, default=None,
                   help="restore each sparsified task vector's L1 norm (default: on for dare_*)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the DARE methods' random sparsification (default: 0)")
    p.add_argument("--format", dest="hf_format", choices=("auto", "jai"), default="auto",
                   help="merge tensor by tensor as the export in this format (mcore-to-hf "
                        "--format) holds them")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default=None,
                   help="output dtype (default: the config's, else the inputs'); the merge "
                        "computes in fp32")
    p.add_argument("--name", default=None, help="model name in model_config.json (default: the "
                                                "first input's)")
    p.add_argument("--force", action="store_true",
                   help="replace --out (the old one is removed only once the new one is complete)")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="threads that read and merge the next tensors while one is written, and "
                        "make the inputs' task vectors at once (default: the CPU count, at most 8; "
                        "1: one tensor at a time)")
    p.add_argument("--measure-memory", action="store_true",
                   help="count the bytes of tensors held at once (in the summary line; slower)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from megatron_jai.checkpoint.convert import DTYPES
    from megatron_jai.checkpoint.merge import merge_checkpoints, read_config, summary_line

    flags = {dest: getattr(args, dest) for dest in SHARED_FLAGS if getattr(args, dest) is not None}
    if args.config:
        given = [f"--{d}" for d in ("method", "inputs", "weights", "base") if getattr(args, d)]
        given += [f"--{SHARED_FLAGS[d]}" for d in flags]
        if given:
            raise cli.UserError(f"--config gives the method, models and parameters; drop "
                                f"{', '.join(given)}")
        spec = read_config(args.config)
    else:
        if not args.inputs:
            raise cli.UserError("give --inputs (or a mergekit --config)")
        weights = args.weights
        if weights is not None and len(weights) != len(args.inputs):
            raise cli.UserError(f"{len(weights)} weights for {len(args.inputs)} inputs")
        spec = {"method": args.method or "linear", "inputs": args.inputs, "base": args.base,
                "parameters": {SHARED_FLAGS[d]: v for d, v in flags.items()},
                "model_parameters": [{} if weights is None else {"weight": w} for w in weights or
                                     args.inputs]}
    if args.workers is not None and args.workers < 1:
        raise cli.UserError(f"--workers must be at least 1, got {args.workers}")
    if args.dtype:
        spec["dtype"] = DTYPES[args.dtype]
    summary = merge_checkpoints(**spec, out=args.out, seed=args.seed, hf_format=args.hf_format,
                                name=args.name, force=args.force, measure=args.measure_memory,
                                workers=args.workers,
                                progress=not args.no_progress and sys.stderr.isatty())
    print(summary_line(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(PROG, main))
