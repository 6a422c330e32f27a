#!/usr/bin/env python
"""Loss and throughput curves from pretrain_jai.py --metrics-file JSON lines, to a PNG.

Example:
  python tools/plot_training.py runs/demo/metrics.jsonl --out runs/demo/loss.png
  python tools/plot_training.py a.jsonl b.jsonl --out compare.png   # overlay runs
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_jai import cli  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("metrics", nargs="+", metavar="METRICS.jsonl",
                   help="metrics files (one JSON object per step); several are overlaid")
    p.add_argument("--out", required=True, help="output PNG path")
    p.add_argument("--title", default=None, help="figure title (default: the file names)")
    p.add_argument("--smooth", type=int, default=1,
                   help="moving average over this many steps for loss and throughput")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from megatron_jai.training.plots import plot_runs, read_metrics, summarize

    if args.smooth < 1:
        raise cli.UserError(f"--smooth must be >= 1, got {args.smooth}")
    runs = [read_metrics(path) for path in args.metrics]
    plot_runs(runs, args.out, title=args.title, smooth=args.smooth)
    for run in runs:
        if run.skipped_lines:
            print(f"warning: {run.path}: skipped {run.skipped_lines} unreadable lines",
                  file=sys.stderr)
        print(summarize(run))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run("plot_training.py", main))
