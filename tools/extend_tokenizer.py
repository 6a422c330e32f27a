#!/usr/bin/env python
"""Merge the pieces of a trained sentencepiece BPE (tools/train_tokenizer.py) into a base
tokenizer (default: Phi-3). Base ids keep their meaning: the base sentencepiece pieces keep their
ids, the base's special tokens keep theirs, new pieces follow up to --target-vocab ids in total.

Writes OUT/tokenizer.model (sentencepiece), a Hugging Face tokenizer (tokenizer.json,
tokenizer_config.json with the base chat template, special_tokens_map.json, added_tokens.json)
that encodes identically, and OUT/vocab_map.json (old id -> new id, read by `upscale.py vocab`).

Example:
  python tools/extend_tokenizer.py --base ../shared/tokenizers/phi3 --add .cache/thai_bpe40k \\
      --target-vocab 64000 --out .cache/phi3_thai64k
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_jai import cli  # noqa: E402
from megatron_jai.paths import shared_path  # noqa: E402
from megatron_jai.upscale.tokenizer import PIECE_FILTERS, extend_tokenizer  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default=shared_path("tokenizers", "phi3"),
                   help="base tokenizer directory (tokenizer.model [+ added_tokens.json, tokenizer_config.json])")
    p.add_argument("--add", required=True, help="sentencepiece model (file or directory) whose pieces are added")
    p.add_argument("--target-vocab", type=int, required=True, help="total ids of the merged tokenizer")
    p.add_argument("--out", required=True, help="output tokenizer directory")
    p.add_argument("--pieces", choices=sorted(PIECE_FILTERS), default="thai",
                   help="which new pieces may be added (thai: Thai script only, English encodings unchanged)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    args = p.parse_args(argv)
    r = extend_tokenizer(args.base, args.add, args.target_vocab, args.out, pieces=args.pieces,
                         threads=args.threads, force=args.force,
                         log=lambda s: print(f"extend_tokenizer: {s}", file=sys.stderr))
    print(f"extend_tokenizer: base {r.base_vocab} ids + {r.added} new pieces = {r.vocab_size} ids "
          f"({r.dropped_unreachable} unreachable candidates replaced, {r.rounds} rounds) -> {r.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run("extend_tokenizer.py", main))
