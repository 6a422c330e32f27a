#!/usr/bin/env python
"""JSON lines (plain or gzip) -> Megatron-Core indexed dataset (PREFIX.bin / PREFIX.idx).

Example:
  python tools/preprocess_data.py --input ../shared/data/thai/thaigov_v2.train.jsonl.gz \
      --output-prefix data/thai_train --tokenizer ../shared/tokenizers/phi3 --workers 2

Bad lines (not JSON, missing field, non-string or empty text) are counted, reported and skipped;
more than --max-bad-fraction of them (default 1%) fails the run (exit 2). A worker process that
dies (e.g. killed by the OOM killer) fails it too, with one line. Output is written under temporary names and renamed at the end: an error or an interrupt never
leaves a partial .bin/.idx behind.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_jai import cli  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, metavar="FILE",
                   help="JSON-lines files, plain or gzip; all go into one dataset, in order")
    p.add_argument("--output-prefix", required=True, metavar="PREFIX",
                   help="output path without extension: writes PREFIX.bin, PREFIX.idx and "
                        "PREFIX.meta.json")
    p.add_argument("--tokenizer", required=True, metavar="PATH",
                   help="sentencepiece .model file, or a directory (tokenizer.json, "
                        "tokenizer.model [+ added_tokens.json], or a transformers tokenizer)")
    p.add_argument("--json-key", default="text",
                   help="field holding the document text; a.b for a nested field (default: text)")
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                   help="tokenizer processes (default: CPU cores - 1)")
    p.add_argument("--no-append-eod", dest="append_eod", action="store_false",
                   help="do not append the end-of-document token to each document")
    p.add_argument("--max-bad-fraction", type=float, default=0.01, metavar="F",
                   help="fail (exit 2, nothing written) when more than this fraction of the lines "
                        "is bad (default: %(default)s; 1 accepts any number of bad lines)")
    p.add_argument("--force", action="store_true", help="replace an existing PREFIX.bin/.idx")
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bar")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from megatron_jai.data.preprocess import preprocess

    stats = preprocess(args.input, args.output_prefix, args.tokenizer, text_key=args.json_key,
                       workers=args.workers, append_eod=args.append_eod, overwrite=args.force,
                       progress=args.progress, max_bad_fraction=args.max_bad_fraction)
    print(stats.summary())
    return 0


if __name__ == "__main__":
    sys.exit(cli.run("preprocess_data.py", main))
