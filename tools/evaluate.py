#!/usr/bin/env python
"""Evaluate a Megatron checkpoint or a Hugging Face directory: bits per character / byte and
perplexity of texts, NTREX-128 translation (chrF), iApp wiki QA (exact match, F1), lm-eval tasks.

  python tools/evaluate.py --model CKPT|HF_DIR [--task NAME ...] [--text FILE ...] \\
      [--output results.json] [--limit N] [--tokenizer T]
  torchrun --nproc_per_node 4 tools/evaluate.py --model CKPT --tp 2 --pp 2 --task bits

Tasks (--list-tasks): thai_valid thai_test english_valid english_test ntrex_tha ntrex_eng (bits),
ntrex_en_th ntrex_th_en (translation), iapp_qa, lm-eval:ntrex_th_mc lm-eval:ntrex_en_mc (Hugging
Face directories); groups: bits (the default), translation, all. Writes the JSON (a bits_per_char
value per text input, every metric per task) and prints a table. Nothing is fetched from a hub.
See docs/evaluation.md.
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_jai import cli  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="Megatron checkpoint (root or iter_*) or Hugging Face directory")
    p.add_argument("--tokenizer", default=None, help="tokenizer (default: the one the model carries)")
    p.add_argument("--task", action="append", default=[], metavar="NAME",
                   help="task or group, repeatable (default: bits)")
    p.add_argument("--text", action="append", default=[], metavar="FILE",
                   help="also score this text file (.txt: one document a line; .jsonl[.gz]: --text-key)")
    p.add_argument("--text-key", default="text", help="JSON field of --text documents")
    p.add_argument("--output", default=None, help="results JSON to write")
    p.add_argument("--limit", type=int, default=None, help="documents / items per task")
    p.add_argument("--batch-size", type=int, default=4, help="sequences per forward pass")
    p.add_argument("--context", type=int, default=None, help="scoring window (default: the model's)")
    p.add_argument("--stride", type=int, default=None,
                   help="new tokens per scoring window of long documents (default: context - 1)")
    p.add_argument("--score-vocab", type=int, default=None, metavar="N",
                   help="bits tasks: probabilities over the first N ids only (a vocabulary-extended "
                        "model scored as its base on text the base ids encode)")
    p.add_argument("--shots", type=int, default=3, help="translation examples in the prompt")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="generation tasks (default: translation 256, QA 64)")
    p.add_argument("--chat", action="store_true",
                   help="generation tasks as zero-shot chat turns (the tokenizer's chat template)")
    p.add_argument("--lm-eval-include", action="append", default=[], metavar="DIR",
                   help="more lm-eval task YAML folders (local data only)")
    cli.add_layout_arguments(p, " (checkpoints)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None,
                   help="compute dtype (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--list-tasks", action="store_true", help="print the task names and exit")
    return p


def _check_output(path: str) -> None:
    if os.path.isdir(path):
        raise cli.UserError(f"--output {path} is a directory")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise cli.UserError(f"--output: folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise cli.UserError(f"--output: folder {parent} is not writable")


def _write_json(path: str, obj: dict) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, ensure_ascii=False, allow_nan=True)
            f.write("\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from megatron_jai.evaluation.runner import EvalOptions, format_table, run_task
    from megatron_jai.evaluation.tasks import GROUPS, all_task_names, resolve_tasks
    from megatron_jai.inference.lm import load_language_model, model_kind

    if args.list_tasks:
        print("tasks:", " ".join(all_task_names()))
        print("groups:", " ".join(f"{g}={','.join(t)}" for g, t in GROUPS.items()))
        return 0
    if not args.model:
        raise cli.UserError("--model is required")
    opts = EvalOptions(limit=args.limit, batch_size=args.batch_size, context=args.context,
                       stride=args.stride, shots=args.shots, max_new_tokens=args.max_new_tokens,
                       chat=args.chat, text_key=args.text_key, progress=not args.no_progress,
                       lm_eval_dirs=tuple(args.lm_eval_include), score_vocab=args.score_vocab)
    tasks = resolve_tasks(args.task or ([] if args.text else ["bits"]), args.text,
                          opts.lm_eval_dirs)
    kind = model_kind(args.model)
    if kind == "megatron" and any(t.kind == "lm-eval" for t in tasks):
        raise cli.UserError("lm-eval tasks run on Hugging Face directories: export the checkpoint "
                            "(tools/convert_checkpoint.py mcore-to-hf) and evaluate that")
    if args.output:
        _check_output(args.output)
    start = time.time()
    lm = load_language_model(args.model, args.tokenizer, tp=args.tp, pp=args.pp, ep=args.ep,
                             dtype=args.dtype, first_stage_layers=args.first_stage_layers,
                             last_stage_layers=args.last_stage_layers)
    try:
        results = {t.name: run_task(lm, t, opts) for t in tasks}
        if lm.is_main:
            report = {"model": lm.describe(), "options": opts.as_dict(),
                      "bits_per_char": {n: r["bits_per_char"] for n, r in results.items()
                                        if r["kind"] == "bits"},
                      "tasks": results, "seconds": round(time.time() - start, 1)}
            if args.output:
                _write_json(args.output, report)
            print(format_table(results))
            where = f", results in {args.output}" if args.output else ""
            print(f"evaluate: {len(results)} task(s) on {args.model} ({lm.backend}) in "
                  f"{time.time() - start:.1f}s{where}", flush=True)
    finally:
        lm.close()
    return 0


if __name__ == "__main__":
    from megatron_jai.inference.lm import USER_ERRORS

    sys.exit(cli.run("evaluate.py", main, user_errors=USER_ERRORS))
