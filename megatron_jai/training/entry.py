"""What the training entry scripts share: flags + YAML in, a dry run or the one loop, one-line
errors out (exit codes of :mod:`megatron_jai.cli`)."""
from __future__ import annotations

import os
import sys
from typing import Callable, Optional


def train_main(prog: str, argv: list, parser=None,
               objective_factory: Optional[Callable] = None) -> int:
    from megatron_jai.cli import EXIT_USAGE, UserError, quiet_warnings

    quiet_warnings()
    from megatron_jai.training.arguments import parse_args

    try:
        args = parse_args(argv, parser)
        objective = objective_factory(args) if objective_factory else None
        if args.dry_run:
            from megatron_jai.training.dry_run import dry_run

            return dry_run(args, objective, prog)
        from megatron_jai.training.loop import run

        return run(args, objective)
    except UserError as err:  # TrainingError and the package's other error types
        rank = int(os.environ.get("RANK", "0"))
        specific = getattr(err, "rank_specific", False)
        if specific or rank == 0:
            prefix = f"[rank {rank}] " if specific else ""
            print(f"{prog}: error: {prefix}{' '.join(str(err).split())}", file=sys.stderr,
                  flush=True)
        return EXIT_USAGE
