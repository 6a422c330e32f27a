#!/usr/bin/env python
"""Chat JSON lines (plain or gzip) -> Megatron-Core indexed datasets of tokens and loss masks.

Example:
  python tools/preprocess_chat.py --kind sft --seq-length 2048 --tokenizer ../shared/tokenizers/phi3 \
      --input ../shared/data/post/en_sft_gsm8k_train.jsonl.gz --output-prefix data/sft_gsm8k

Writes PREFIX.bin/.idx (tokens), PREFIX_mask.bin/.idx (uint8 loss mask: 1 on the assistant turns,
each turn's closing token included) and PREFIX.meta.json. SFT records: {"messages": [{"role",
"content"}, ...]}; DPO records: {"prompt": [messages], "chosen": str, "rejected": str} (answers may
be message lists). Conversations are rendered with the tokenizer's own chat template. Bad records
are counted by reason and skipped; more than --max-bad-fraction of them, or any other error, and
nothing is written (exit 2). See docs/data.md, "Chat data".
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_jai import cli  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kind", required=True, choices=("sft", "dpo"),
                   help="sft: conversations (messages); dpo: preference pairs")
    p.add_argument("--input", nargs="+", required=True, metavar="FILE",
                   help="JSON-lines files, plain or gzip; all go into one dataset, in order")
    p.add_argument("--output-prefix", required=True, metavar="PREFIX",
                   help="output path without extension (PREFIX.bin/.idx, PREFIX_mask.bin/.idx, "
                        "PREFIX.meta.json)")
    p.add_argument("--tokenizer", required=True, metavar="DIR",
                   help="tokenizer directory with a chat template (e.g. ../shared/tokenizers/phi3 "
                        "or an extended tokenizer from tools/extend_tokenizer.py)")
    p.add_argument("--seq-length", type=int, default=4096, metavar="N",
                   help="longest sequence in tokens (default: 4096)")
    p.add_argument("--too-long", choices=("truncate", "skip", "keep_start"), default="truncate",
                   help="records longer than --seq-length: truncate (drop the oldest rounds, keep "
                        "the final assistant turn), skip them, or keep_start (TRL's truncation: "
                        "the first --seq-length tokens of the whole conversation) "
                        "(default: truncate)")
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                   help="tokenizer processes (default: CPU cores - 1)")
    p.add_argument("--max-bad-fraction", type=float, default=0.01, metavar="F",
                   help="fail (exit 2, nothing written) when more than this fraction of the lines "
                        "are bad records (default: 0.01)")
    p.add_argument("--force", action="store_true", help="replace an existing dataset")
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bar")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from megatron_jai.data.chat import preprocess_chat
    from megatron_jai.data.preprocess import PreprocessError

    try:
        stats = preprocess_chat(args.kind, args.input, args.output_prefix, args.tokenizer,
                                seq_length=args.seq_length, too_long=args.too_long,
                                workers=args.workers, max_bad_fraction=args.max_bad_fraction,
                                overwrite=args.force, progress=args.progress)
    except PreprocessError as err:  # an unreadable (truncated) input file
        raise cli.UserError(str(err)) from None
    print(stats.summary())
    return 0


if __name__ == "__main__":
    sys.exit(cli.run("preprocess_chat.py", main))
