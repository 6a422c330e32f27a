"""Pretrain a JAI / Phi-3 model on Megatron-Core: ``torchrun --nproc_per_node N pretrain_jai.py``.

With no arguments: the embedded tiny default (the ``tiny`` model on the project's demo corpus, 2 CPU
processes). ``--help`` lists the flags; ``--config run.yaml`` reads them (plus data blends and
phases) from a file; ``--dry-run --world-size N`` checks a launch on one CPU process. The program
lives in :mod:`megatron_jai.training`; see docs/training.md.
"""
import sys


def main(argv=None) -> int:
    from megatron_jai.training.entry import train_main

    return train_main("pretrain_jai.py", sys.argv[1:] if argv is None else argv)


# The guard is required: dist_checkpointing's async writer re-imports the main module.
if __name__ == "__main__":
    sys.exit(main())
