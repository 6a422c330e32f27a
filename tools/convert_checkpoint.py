#!/usr/bin/env python
"""Convert checkpoints between Hugging Face and Megatron-Core (dist_checkpointing).

  python tools/convert_checkpoint.py hf-to-mcore --hf-dir H --out M --tp T --pp P [--force]
  python tools/convert_checkpoint.py mcore-to-hf --mcore-dir M --out H2 [--tokenizer T] [--force]

Hugging Face side: Phi-3 (dense), Mixtral (experts) and JAI (DUS skips, experts with any router
options, RoPE interpolation; its modeling code is copied into the directory and loads with
trust_remote_code=True). mcore-to-hf picks the plainest that expresses the model (--format jai
forces JAI) and writes the tokenizer the model was trained with (the checkpoint's, or --tokenizer),
its special-token ids and a generation config.

Streams tensor by tensor (one HF shard and one layer at most in memory) and prints a summary line:
tensors, bytes, seconds, peak RSS. See docs/checkpoints.md and docs/export.md.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_jai import cli  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    dtypes = ["fp32", "bf16", "fp16"]

    a = sub.add_parser("hf-to-mcore", help="Hugging Face directory (Phi-3, Mixtral, JAI) -> Megatron-Core "
                       "checkpoint")
    a.add_argument("--hf-dir", required=True, help="HF directory (config.json + safetensors)")
    a.add_argument("--out", required=True, help="Megatron checkpoint root to create")
    a.add_argument("--tp", type=int, default=1, help="tensor parallel size to validate for (the "
                   "checkpoint loads at any valid TP)")
    a.add_argument("--pp", type=int, default=1, help="pipeline parallel size to validate for")
    a.add_argument("--ep", type=int, default=1, help="expert parallel size to validate for (MoE / "
                   "Mixtral checkpoints; must divide the experts; any valid EP loads the result)")
    a.add_argument("--name", default=None, help="model name in model_config.json (default: HF dir name)")
    a.add_argument("--dtype", choices=dtypes, default=None, help="cast tensors (default: keep)")
    a.add_argument("--force", action="store_true", help="replace --out if it exists")
    a.add_argument("--no-progress", action="store_true", help="no progress bar")

    b = sub.add_parser("mcore-to-hf", help="Megatron-Core checkpoint -> Hugging Face directory")
    b.add_argument("--mcore-dir", required=True, help="checkpoint root (newest iteration) or iter_* dir")
    b.add_argument("--out", required=True, help="HF directory to create")
    b.add_argument("--tokenizer", default=None,
                   help="the tokenizer the model was trained with (a tokenizer directory, a "
                        "sentencepiece .model, or phi3); default: the one stored in the checkpoint")
    b.add_argument("--format", dest="hf_format", choices=["auto", "jai"], default="auto",
                   help="auto: Phi-3 / Mixtral when they express the model, else JAI; jai: always "
                        "the JAI architecture (default: auto)")
    b.add_argument("--max-shard-size", default="5GB", help="largest safetensors file (default 5GB)")
    b.add_argument("--dtype", choices=dtypes, default=None, help="cast tensors (default: keep)")
    b.add_argument("--force", action="store_true", help="replace --out if it exists")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from megatron_jai.checkpoint.convert import DTYPES, hf_to_mcore
    from megatron_jai.hf.export import mcore_to_hf

    dtype = DTYPES[args.dtype] if args.dtype else None
    if args.command == "hf-to-mcore":
        summary = hf_to_mcore(args.hf_dir, args.out, tp=args.tp, pp=args.pp, force=args.force,
                              name=args.name, dtype=dtype, progress=not args.no_progress,
                              ep=args.ep)
    else:
        summary = mcore_to_hf(args.mcore_dir, args.out, force=args.force,
                              max_shard_size=args.max_shard_size, dtype=dtype,
                              progress=not args.no_progress, tokenizer=args.tokenizer,
                              hf_format=args.hf_format)
    for note in summary.notes:
        print(f"convert_checkpoint: note: {note}", file=sys.stderr)
    print(summary.line())
    return 0


if __name__ == "__main__":
    sys.exit(cli.run("convert_checkpoint.py", main))
