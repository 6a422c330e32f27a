"""Command line and YAML run config of ``pretrain_jai.py``.

Every flag can also be given in the YAML file passed with ``--config`` (same name, ``-`` or ``_``);
flags on the command line override the file. Besides flags, the YAML may hold ``data:`` (named
dataset prefixes), and either ``phases:`` (a list of phases) or ``plan:`` (a built-in plan such as
``jai``); see :mod:`megatron_jai.training.phases` and docs/training.md.

With no arguments at all the run is the embedded tiny default: the ``tiny`` model on the
project's demo corpus, 2 CPU processes under torchrun, loss falling from ~7 to well under 5.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
from typing import Optional

from megatron_jai import cli
from megatron_jai.training.faults import TrainingError
from megatron_jai.training.phases import Phase, build_phases, resolve_blend, validate_phase

# Keys of the YAML file that are not flags.
CONFIG_ONLY_KEYS = ("data", "valid_data", "phases", "plan")
# Settings holding paths: in a config file they are relative to the file (``model`` only when it is
# not a preset name).
PATH_SETTINGS = ("model", "tokenizer", "data_cache_dir", "load", "init_from", "save",
                 "metrics_file", "tensorboard_dir")


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse's usage errors as the project's one line (``PROG: error: ...``, exit 2), without
    the page of usage before it (``--help`` shows that)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())}\n")


def build_parser(prog: str = "pretrain_jai.py", description: Optional[str] = None,
                 parser: Optional[argparse.ArgumentParser] = None) -> argparse.ArgumentParser:
    """The training flags (every entry point of the one loop shares them); ``parser``: add them
    to an existing (sub)parser."""
    from megatron_jai.cli import HelpFormatter

    p = parser or OneLineErrorParser(
        prog=prog,
        description=description or "Pretrain a JAI/Phi-3 model on Megatron-Core (TP/PP/EP/DP). "
                                   "Run under torchrun; with no arguments it trains the tiny "
                                   "model on the demo corpus.",
        formatter_class=HelpFormatter)
    a = p.add_argument
    a("--config", help="YAML run config; flags on the command line override it")
    a("--dry-run", action="store_true",
      help="one CPU process, no GPU: resolve the config as a launch would, check every layout "
           "and divisibility rule, print the stage layout, parameters and memory per GPU and the "
           "phase plan; exit non-zero on anything that would fail at launch")
    a("--world-size", type=int, default=None,
      help="with --dry-run: the number of GPUs of the planned launch")
    a("--no-file-checks", dest="file_checks", action="store_false",
      help="with --dry-run: skip the checks of data, tokenizer and checkpoint files (planning "
           "away from the cluster's filesystem)")
    a("--gpu-memory-gib", type=float, default=None,
      help="with --dry-run: memory of one GPU; a larger estimate is a problem (default 80, H100)")

    g = p.add_argument_group("model and layout")
    g.add_argument("--model", default=None,
                   help="preset name, model_config.json or checkpoint dir (default: the --load "
                        "checkpoint's config when resuming, else 'tiny')")
    g.add_argument("--tp", type=int, default=1, help="tensor parallel size")
    g.add_argument("--pp", type=int, default=1, help="pipeline parallel size")
    g.add_argument("--first-stage-layers", type=int, default=None,
                   help="uneven pipeline split: decoder layers on the first stage (the stages "
                        "without a count share the rest evenly; see tools/upscale.py dus)")
    g.add_argument("--last-stage-layers", type=int, default=None,
                   help="uneven pipeline split: decoder layers on the last stage")
    g.add_argument("--ep", type=int, default=1, help="expert parallel size (MoE models)")
    g.add_argument("--dp", type=int, default=None,
                   help="data parallel size; derived as world/(tp*pp), checked if given")
    g.add_argument("--sequence-parallel", action="store_true",
                   help="Megatron sequence parallelism (TP > 1)")
    prec = g.add_mutually_exclusive_group()
    prec.add_argument("--bf16", dest="bf16", action="store_true", default=None,
                      help="bf16 weights/compute with fp32 master weights (default on GPU)")
    prec.add_argument("--fp32", dest="bf16", action="store_false",
                      help="fp32 everything (default on CPU)")
    g.add_argument("--use-distributed-optimizer", dest="use_distributed_optimizer",
                   action="store_true", default=None,
                   help="shard optimizer state over DP (default on GPU; not available on CPU)")
    g.add_argument("--no-distributed-optimizer", dest="use_distributed_optimizer",
                   action="store_false")
    g.add_argument("--moe-aux-loss-coeff", type=float, default=None,
                   help="MoE load-balancing loss coefficient (default: the model config's)")
    g.add_argument("--moe-z-loss-coeff", type=float, default=None,
                   help="MoE router z-loss coefficient (default: the model config's)")
    g.add_argument("--recompute-activations", action="store_true",
                   help="full activation recomputation (saves memory at long sequence lengths)")

    g = p.add_argument_group("batch and schedule")
    g.add_argument("--micro-batch-size", type=int, default=4)
    g.add_argument("--global-batch-size", type=int, default=16)
    g.add_argument("--seq-length", type=int, default=128)
    g.add_argument("--train-iters", type=int, default=None,
                   help="steps to train; with phases/plan: stop (and save) after this many steps "
                        "in total")
    g.add_argument("--train-tokens", type=int, default=None,
                   help="token budget instead of --train-iters")
    g.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (> 0)")
    g.add_argument("--min-lr", type=float, default=None,
                   help="learning rate at the end of the decay, 0 <= min-lr <= lr (default: a "
                        "tenth of the phase's peak)")
    g.add_argument("--warmup-iters", type=int, default=10)
    g.add_argument("--lr-decay-iters", type=int, default=None,
                   help="decay length (default: the phase length)")
    g.add_argument("--lr-decay-style", default="cosine",
                   choices=["cosine", "linear", "constant", "inverse-square-root", "WSD"])
    g.add_argument("--lr-wsd-decay-iters", type=int, default=None,
                   help="WSD: steps of the final decay (required with --lr-decay-style WSD)")
    g.add_argument("--lr-wsd-decay-style", default="exponential",
                   choices=["linear", "cosine", "exponential", "minus_sqrt"],
                   help="WSD: shape of the final decay")
    g.add_argument("--use-checkpoint-schedule", action="store_true",
                   help="on resume, keep the checkpoint's LR schedule where this run's differs "
                        "(default: this run's flags win; the differences are printed)")
    g.add_argument("--weight-decay", type=float, default=0.1, help=">= 0")
    g.add_argument("--adam-beta1", type=float, default=0.9, help="in [0, 1)")
    g.add_argument("--adam-beta2", type=float, default=0.95, help="in [0, 1)")
    g.add_argument("--adam-eps", type=float, default=1e-8, help="> 0")
    g.add_argument("--clip-grad", type=float, default=1.0,
                   help="clip the global gradient norm to this (0 = no clipping)")
    g.add_argument("--seed", type=int, default=1234)

    g = p.add_argument_group("data")
    g.add_argument("--data-path", nargs="+", default=None,
                   help="one indexed-dataset prefix, or a blend 'W1 PREFIX1 W2 PREFIX2 ...' "
                        "(default: the project's demo corpus)")
    g.add_argument("--tokenizer", default=None,
                   help="tokenizer the data was made with (checked against the model vocabulary)")
    g.add_argument("--data-cache-dir", default=None,
                   help="where index caches / the demo corpus go (default <repo>/.cache)")
    g.add_argument("--num-workers", type=int, default=None,
                   help="data loader worker processes (default 2 on GPU, 0 on CPU)")
    g.add_argument("--valid-data-path", nargs="+", default=None,
                   help="validation data, a prefix or a blend like --data-path (for every phase; "
                        "a config's phases may give their own valid_blend, or valid_data: for "
                        "the jai plan)")
    g.add_argument("--eval-interval", type=int, default=0,
                   help="validation loss every N steps (0 = off; needs validation data)")
    g.add_argument("--eval-iters", type=int, default=2, help="validation batches per evaluation")
    g.add_argument("--eval-only", action="store_true",
                   help="evaluate the (--load / --init-from) model on every phase's validation "
                        "data once and exit: no training, nothing saved")

    g = p.add_argument_group("checkpoints")
    g.add_argument("--load", default=None, help="resume from the latest complete checkpoint here")
    g.add_argument("--load-iteration", type=int, default=None,
                   help="resume from this saved iteration instead of the latest")
    g.add_argument("--init-from", default=None,
                   help="start from the model weights of this checkpoint (converted / upscaled "
                        "model; optimizer and schedule start fresh); ignored when --load resumes")
    g.add_argument("--save", default=None, help="checkpoint root to save to")
    g.add_argument("--save-interval", type=int, default=0, help="save every N steps (0 = only at "
                   "phase ends, the end and on SIGTERM)")
    g.add_argument("--keep-last", type=int, default=3, help="keep the newest K checkpoints")
    g.add_argument("--overwrite-save", action="store_true",
                   help="delete checkpoints already in --save when not resuming from it")
    g.add_argument("--force-unlock", action="store_true",
                   help="take over --save's lock (jai_run.lock) held by a run on another host "
                        "that is known to have ended")

    g = p.add_argument_group("logging")
    g.add_argument("--log-interval", type=int, default=10)
    g.add_argument("--metrics-file", default=None, help="JSON-lines file, one object per step")
    g.add_argument("--tensorboard-dir", default=None)
    g.add_argument("--peak-tflops", type=float, default=None,
                   help="per-GPU peak for MFU (default 989 = H100 dense bf16 on GPU, none on CPU)")

    g = p.add_argument_group("faults")
    g.add_argument("--max-skipped-steps", type=int, default=10,
                   help="abort after this many NaN/Inf steps in a row")
    g.add_argument("--inject-nan-at-step", type=int, nargs="+", default=None,
                   help="TESTING: make the loss NaN at these steps (they must be skipped)")
    g.add_argument("--exit-after-step", type=int, default=None,
                   help="TESTING: save and stop after this step, as if pre-empted")
    g.add_argument("--kill-during-save-at-step", type=int, default=None,
                   help="TESTING: die (SIGKILL) in the middle of writing this step's checkpoint")
    g.add_argument("--sigterm-during-save-at-step", type=int, default=None,
                   help="TESTING: receive SIGTERM in the middle of writing this step's checkpoint")
    g.add_argument("--full-disk-at-step", type=int, default=None,
                   help="TESTING: the disk fills up while this step's checkpoint is written")
    return p


def parse_args(argv: Optional[list] = None,
               parser: Optional[argparse.ArgumentParser] = None) -> argparse.Namespace:
    """Flags + YAML -> one namespace; ``args.phases`` is the resolved list of :class:`Phase`."""
    parser = parser or build_parser()
    config_path = _find_config(argv)
    config = cli.read_yaml(config_path, TrainingError) if config_path else {}
    flags = {a.dest for a in parser._actions}
    defaults = {}
    for key, value in config.items():
        if key in CONFIG_ONLY_KEYS:
            continue
        dest = key.replace("-", "_")
        if dest not in flags or dest in ("config", "help"):
            raise TrainingError(f"config {config_path}: unknown setting {key!r}")
        if dest in PATH_SETTINGS and isinstance(value, str):
            from megatron_jai.presets import PRESETS

            if not (dest == "model" and value in PRESETS):
                value = _expand(value, os.path.dirname(os.path.abspath(config_path)))
        defaults[dest] = value
    parser.set_defaults(**defaults)
    args = parser.parse_args(argv)
    args.config_path = config_path
    args.no_arguments = not argv
    sections = {}
    for key in ("data", "valid_data"):
        named = config.get(key) or {}
        if not isinstance(named, dict):
            raise TrainingError(f"config {key}: must map dataset names to indexed-dataset prefixes")
        if config_path:
            base = os.path.dirname(os.path.abspath(config_path))
            named = {k: _expand(v, base) for k, v in named.items()}
        sections[key] = named
    args.datasets, args.valid_datasets = sections["data"], sections["valid_data"]
    _check_numbers(args, parser)
    args.phases = build_phases(config.get("phases"), config.get("plan"), args.datasets,
                               args.valid_datasets)
    _validate(args)
    if args.phases is not None and args.valid_data_path:
        valid, labels = _blend_from_flag(args.valid_data_path, args.valid_datasets, "--valid-data-path")
        args.phases = [dataclasses.replace(p, valid_blend=valid, valid_dataset_names=labels)
                       for p in args.phases]
    return args


def _find_config(argv) -> Optional[str]:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--config")
    known, _ = p.parse_known_args(argv)
    return known.config


def _expand(path: str, base: str) -> str:
    """``~`` and ``$VARS`` expanded; relative paths are relative to the config file."""
    path = os.path.expandvars(os.path.expanduser(str(path)))
    return path if os.path.isabs(path) else os.path.normpath(os.path.join(base, path))


def _finite(v):
    return math.isfinite(v)


# Every numeric setting: (rule as the error says it, check). Checked after flags and YAML are
# merged, so a flag, a config value and a dry run get the same one-line error.
NUMBER_RULES = {
    "lr": ("a finite number > 0", lambda v: _finite(v) and v > 0),
    "min_lr": ("a finite number >= 0", lambda v: _finite(v) and v >= 0),
    "weight_decay": ("a finite number >= 0", lambda v: _finite(v) and v >= 0),
    "adam_beta1": ("in [0, 1)", lambda v: 0 <= v < 1),
    "adam_beta2": ("in [0, 1)", lambda v: 0 <= v < 1),
    "adam_eps": ("a finite number > 0", lambda v: _finite(v) and v > 0),
    "clip_grad": ("a finite number >= 0 (0 = no clipping)", lambda v: _finite(v) and v >= 0),
    "warmup_iters": ("an integer >= 0", lambda v: v >= 0),
    "lr_decay_iters": ("an integer >= 0", lambda v: v >= 0),
    "lr_wsd_decay_iters": ("an integer >= 0", lambda v: v >= 0),
    "train_iters": ("a positive integer", lambda v: v >= 1),
    "train_tokens": ("a positive integer", lambda v: v >= 1),
    "seed": ("an integer in [0, 2**32)", lambda v: 0 <= v < 2 ** 32),
    "moe_aux_loss_coeff": ("a finite number >= 0", lambda v: _finite(v) and v >= 0),
    "moe_z_loss_coeff": ("a finite number >= 0", lambda v: _finite(v) and v >= 0),
    "num_workers": ("an integer >= 0", lambda v: v >= 0),
    "eval_interval": ("an integer >= 0 (0 = off)", lambda v: v >= 0),
    "eval_iters": ("a positive integer", lambda v: v >= 1),
    "save_interval": ("an integer >= 0 (0 = off)", lambda v: v >= 0),
    "load_iteration": ("an integer >= 0", lambda v: v >= 0),
    "max_skipped_steps": ("an integer >= 0", lambda v: v >= 0),
    "gpu_memory_gib": ("a finite number > 0", lambda v: _finite(v) and v > 0),
    "peak_tflops": ("a finite number > 0", lambda v: _finite(v) and v > 0),
}


def _check_numbers(args, parser: argparse.ArgumentParser) -> None:
    """Every numeric setting against :data:`NUMBER_RULES` (None: not given, allowed); a value of
    the wrong type (a config's string or list) is refused the same way."""
    types = {a.dest: a.type for a in parser._actions if a.type in (int, float)}
    for name, (rule, valid) in NUMBER_RULES.items():
        value = getattr(args, name, None)
        if value is None:
            continue
        flag = "--" + name.replace("_", "-")
        kind = types.get(name, float)
        try:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) \
                and (kind is float or float(value).is_integer()) and valid(value)
        except (TypeError, ValueError, OverflowError):
            ok = False
        if not ok:
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            shown = kind(value) if number and kind is float else value  # -1 from YAML: -1.0
            raise TrainingError(f"{flag} must be {rule}, got {shown!r}")
        setattr(args, name, kind(value))
    if args.min_lr is not None and args.min_lr > args.lr:
        raise TrainingError(f"--min-lr {args.min_lr:g} is above --lr {args.lr:g}: the minimum "
                            f"learning rate must be <= the peak")


def _validate(args) -> None:
    for name in ("tp", "pp", "ep", "micro_batch_size", "global_batch_size", "seq_length",
                 "log_interval", "keep_last"):
        if getattr(args, name) is None or getattr(args, name) < 1:
            raise TrainingError(f"--{name.replace('_', '-')} must be a positive integer")
    if args.dp is not None and args.dp < 1:
        raise TrainingError("--dp must be a positive integer")
    if args.world_size is not None and not args.dry_run:
        raise TrainingError("--world-size is for --dry-run (a launch takes it from torchrun)")
    if args.dry_run and (args.world_size is None or args.world_size < 1):
        raise TrainingError("--dry-run needs --world-size N (the number of GPUs of the launch)")
    for name in ("first_stage_layers", "last_stage_layers"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise TrainingError(f"--{name.replace('_', '-')} must be a positive integer")
        if getattr(args, name) is not None and args.pp < 2:
            raise TrainingError(f"--{name.replace('_', '-')} needs --pp 2 or more")
    if args.phases is not None:
        # With phases, --train-iters only caps the run's total steps (e.g. a smoke test).
        if args.data_path or args.train_tokens:
            raise TrainingError("--data-path / --train-tokens conflict with the config's "
                                "phases/plan (put them in the phases)")
        return
    if args.train_iters is not None and args.train_tokens is not None:
        raise TrainingError("give --train-iters or --train-tokens, not both")
    if args.train_iters is None and args.train_tokens is None:
        args.train_iters = 200 if args.data_path is None else None
        if args.train_iters is None:
            raise TrainingError("give --train-iters or --train-tokens")


def _blend_from_flag(spec: list, datasets: dict, flag: str) -> tuple:
    """``PREFIX`` or ``W1 PREFIX1 W2 PREFIX2 ...`` -> normalised blend entries and labels."""
    if len(spec) == 1:
        blend = spec[0]
    else:
        if len(spec) % 2:
            raise TrainingError(f"{flag} blend must be pairs: W1 PREFIX1 W2 PREFIX2 ...")
        blend = [[spec[i], spec[i + 1]] for i in range(0, len(spec), 2)]
    return resolve_blend(blend, datasets, flag)


def flag_phase(args, demo_prefix: Optional[str] = None, name: str = "pretrain") -> Phase:
    """The single phase described by plain flags (no phases/plan in the config)."""
    spec = args.data_path
    if not spec:
        if demo_prefix is None:
            raise TrainingError("no --data-path given")
        spec = [demo_prefix]
    entries, labels = _blend_from_flag(spec, args.datasets, "--data-path")
    valid, valid_labels = ((), ())
    if args.valid_data_path:
        valid, valid_labels = _blend_from_flag(args.valid_data_path, args.valid_datasets,
                                               "--valid-data-path")
    phase = Phase(name=name, blend=entries, dataset_names=labels, seq_length=args.seq_length,
                  train_iters=args.train_iters, train_tokens=args.train_tokens,
                  valid_blend=valid, valid_dataset_names=valid_labels)
    validate_phase(phase, "--data-path")
    return phase
