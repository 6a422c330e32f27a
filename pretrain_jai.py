"""Pretrain a JAI / Phi-3 model on Megatron-Core: ``torchrun --nproc_per_node N pretrain_jai.py``.

With no arguments: the embedded tiny default (the ``tiny`` model on the project's demo corpus, 2 CPU
processes). ``--help`` lists the flags; ``--config run.yaml`` reads them (plus data blends and
phases) from a file. The program lives in :mod:`megatron_jai.training`; see docs/training.md.
"""
import os
import sys


def main(argv=None) -> int:
    from megatron_jai import cli

    cli.quiet_warnings()  # before Megatron-Core's imports warn
    from megatron_jai.training.arguments import parse_args

    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
        from megatron_jai.training.loop import run

        return run(args)
    except cli.UserError as err:  # TrainingError and the package's other error types
        rank = int(os.environ.get("RANK", "0"))
        rank_specific = getattr(err, "rank_specific", False)
        if rank_specific or rank == 0:
            prefix = f"[rank {rank}] " if rank_specific else ""
            print(f"pretrain_jai.py: error: {prefix}{err}", file=sys.stderr, flush=True)
        return cli.EXIT_USAGE


# The guard is required: dist_checkpointing's async writer re-imports the main module.
if __name__ == "__main__":
    sys.exit(main())
