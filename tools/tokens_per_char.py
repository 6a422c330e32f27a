#!/usr/bin/env python
"""Tokens per character (and UTF-8 bytes per token) of tokenizers on text files, as a table.

Each non-empty line is encoded on its own, without BOS. Tokenizers: a sentencepiece .model, a
Hugging Face directory (tokenizer.json), a tiktoken ranks file, a byte-level BPE directory
(vocab.json + merges.txt), or phi3 / llama3 / qwen2 (shared/tokenizers). Texts: plain text (one
line per segment) or jsonl(.gz) (field --json-key).

Example:
  python tools/tokens_per_char.py --tokenizer phi3 --tokenizer llama3 --tokenizer qwen2 \\
      --text ../shared/data/eval/ntrex128.tha.txt --text ../shared/data/eval/ntrex128.eng.txt
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_jai import cli  # noqa: E402
from megatron_jai.upscale.tokenizer import (  # noqa: E402
    fertility_table, iter_lines, load_text_encoder, measure_fertility)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", action="append", required=True, metavar="TOK", help="repeatable")
    p.add_argument("--text", action="append", required=True, metavar="FILE", help="repeatable")
    p.add_argument("--json-key", default="text")
    p.add_argument("--max-lines", type=int, default=0, help="first N lines of each text (0: all)")
    p.add_argument("--json", metavar="OUT", help="also write the numbers as JSON")
    args = p.parse_args(argv)
    texts = []
    for path in args.text:
        lines = []
        for line in iter_lines(path, args.json_key):
            lines.append(line)
            if args.max_lines and len(lines) >= args.max_lines:
                break
        if not lines:
            raise cli.UserError(f"{path}: no text")
        texts.append((os.path.basename(path), lines))
    results = []
    for spec in cli.progress(args.tokenizer, desc="tokenizers", unit=" tokenizer"):
        enc = load_text_encoder(spec)
        for name, lines in texts:
            results.append(measure_fertility(enc, lines, name))
    print(fertility_table(results))
    if args.json:
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump([dict(r.__dict__, tokens_per_char=r.tokens_per_char,
                            bytes_per_token=r.bytes_per_token) for r in results], f, indent=1)
        os.replace(tmp, args.json)
    print(f"tokens_per_char: {len(args.tokenizer)} tokenizers x {len(texts)} texts "
          f"({sum(len(l) for _, l in texts):,} lines)")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run("tokens_per_char.py", main))
