#!/usr/bin/env python
"""Train a sentencepiece BPE tokenizer (byte fallback) on Thai text, to be merged into a base
vocabulary with tools/extend_tokenizer.py.

Example:
  python tools/train_tokenizer.py --input ../shared/data/thai/thaigov_v2.train.jsonl.gz \\
      --vocab-size 40000 --clean thaigov --out .cache/thai_bpe
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_jai import cli  # noqa: E402
from megatron_jai.upscale.tokenizer import CLEANERS, train_bpe  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", action="append", required=True, metavar="FILE",
                   help="jsonl(.gz) (one JSON document per line) or plain text; repeatable")
    p.add_argument("--vocab-size", type=int, required=True, help="pieces of the trained model")
    p.add_argument("--out", required=True, help="output directory (tokenizer.model, train_args.json)")
    p.add_argument("--json-key", default="text", help="document field of jsonl inputs (default text)")
    p.add_argument("--max-sentences", type=int, default=2_000_000,
                   help="sentences sampled for training (sentencepiece input_sentence_size)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--character-coverage", type=float, default=0.9995)
    p.add_argument("--max-piece-length", type=int, default=16, help="longest piece, in characters")
    p.add_argument("--clean", choices=sorted(CLEANERS), default="none",
                   help="drop page boilerplate before training (thaigov: shared/README.md)")
    p.add_argument("--max-sentence-chars", type=int, default=1000,
                   help="longer lines are cut at spaces into chunks of at most this many characters")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--special-tokens-from", metavar="TOK",
                   help="also take the added special tokens and chat template of this tokenizer "
                        "directory (e.g. phi3), stacked right above the trained pieces: a base "
                        "tokenizer in the Phi-3 layout (added_tokens.json, tokenizer_config.json)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.add_argument("--quiet", action="store_true", help="no sentencepiece log, no progress bar")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    r = train_bpe(args.input, args.vocab_size, args.out, json_key=args.json_key,
                  max_sentences=args.max_sentences, threads=args.threads,
                  character_coverage=args.character_coverage, max_piece_length=args.max_piece_length,
                  clean=args.clean, max_sentence_chars=args.max_sentence_chars, seed=args.seed,
                  special_tokens_from=args.special_tokens_from, force=args.force,
                  progress=not args.quiet, verbose=not args.quiet)
    specials = (f" + {r.special_tokens} special tokens and the chat template of "
                f"{args.special_tokens_from}" if args.special_tokens_from else "")
    print(f"train_tokenizer: BPE vocab {r.vocab_size}{specials} trained on {r.sentences:,} sentences "
          f"({r.characters:,} characters, at most {args.max_sentences:,} sampled) in {r.seconds:.0f} s "
          f"-> {r.model_path}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run("train_tokenizer.py", main))
