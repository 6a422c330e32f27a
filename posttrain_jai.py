"""Post-train a JAI / Phi-3 checkpoint on Megatron-Core, through the same training loop as
pretraining (flags, checkpoints, exact resume, faults, metrics) with another objective:

  torchrun --nproc_per_node N posttrain_jai.py sft --init-from CKPT --data-path P [flags]
  torchrun --nproc_per_node N posttrain_jai.py dpo --init-from CKPT --data-path P [flags]
  torchrun --nproc_per_node N posttrain_jai.py dpo-reference --reference CKPT --data-path P

``sft``: chat SFT on ``tools/preprocess_chat.py --kind sft`` data (loss on the assistant turns).
``dpo``: DPO on ``--kind dpo`` pairs; reference log-probs come from a file beside each dataset,
computed first when missing. ``dpo-reference``: only that reference pass. ``MODE --help`` lists the
flags (pretrain_jai.py's plus the mode's). See docs/posttraining.md.
"""
import sys

MODES = {
    "sft": "supervised fine-tuning on chat data (loss on the assistant turns)",
    "dpo": "direct preference optimisation on chosen/rejected pairs",
    "dpo-reference": "compute the reference log-probs of DPO data (forward only) and exit",
}


def mode_parser(mode: str):
    from megatron_jai.training.arguments import build_parser
    from megatron_jai.training.objectives.dpo import add_dpo_arguments
    from megatron_jai.training.objectives.sft import add_sft_arguments

    parser = build_parser(prog=f"posttrain_jai.py {mode}", description=MODES[mode])
    if mode == "sft":
        add_sft_arguments(parser)
    else:
        add_dpo_arguments(parser, reference_only=mode == "dpo-reference")
    if mode == "dpo-reference":
        parser.set_defaults(train_iters=1)  # no training: the phase only describes the data
    return parser


def objective_for(mode: str):
    from megatron_jai.training.faults import TrainingError
    from megatron_jai.training.objectives.dpo import DPOObjective, DPOReferenceOnly
    from megatron_jai.training.objectives.sft import SFTObjective

    def make(args):
        if args.eval_only and not (args.data_path or args.phases) and args.valid_data_path:
            args.data_path = args.valid_data_path  # nothing trains: evaluation needs no train data
        if not (args.data_path or args.phases or args.dry_run):
            raise TrainingError(f"{mode} needs chat data: --data-path PREFIX (made by "
                                f"tools/preprocess_chat.py --kind {mode.split('-')[0]}) or "
                                f"phases in --config")
        if mode == "sft":
            return SFTObjective(args)
        if mode == "dpo-reference":
            args.init_from = args.reference or args.init_from
            return DPOReferenceOnly(args)
        return DPOObjective(args)

    return make


def main(argv=None) -> int:
    from megatron_jai.cli import EXIT_USAGE
    from megatron_jai.training.entry import train_main

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in MODES:
        out = sys.stdout if argv and argv[0] in ("-h", "--help") else sys.stderr
        print(__doc__.strip() + "\n\nmodes:\n" + "\n".join(f"  {m:<14} {h}" for m, h in
                                                          MODES.items()), file=out)
        if argv and argv[0] not in ("-h", "--help"):
            print(f"posttrain_jai.py: error: unknown mode {argv[0]!r} (choose from "
                  f"{', '.join(MODES)})", file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else EXIT_USAGE
    mode = argv[0]
    return train_main(f"posttrain_jai.py {mode}", argv[1:], parser=mode_parser(mode),
                      objective_factory=objective_for(mode))


# The guard is required: dist_checkpointing's async writer re-imports the main module.
if __name__ == "__main__":
    sys.exit(main())
