"""The JAI-1 upscaling recipe in one command (``tools/upscale.py recipe jai``).

Stages, each writing a complete checkpoint (or tokenizer) under a work directory::

    1 convert    HF Phi-3 -> our checkpoint                  (megatron_jai.checkpoint.convert)
    2 tokenizer  Thai sentencepiece BPE + merge into Phi-3's   (megatron_jai.upscale.tokenizer)
    3 vocab      embedding / output rows for the new ids       (megatron_jai.upscale.vocab)
    4 dus        DUS.v2 depth up-scaling along a plan          (megatron_jai.upscale.dus)
    5 moe        every FFN -> E experts, router near uniform   (megatron_jai.upscale.upcycle)

A stage whose output already exists in the work directory is reused (outputs appear atomically, so
an interrupted run resumes where it stopped); ``--force`` redoes everything. ``--in CKPT`` starts
from one of our checkpoints instead of an HF directory, ``--tokenizer TOK`` uses a prepared extended
tokenizer instead of training one, and ``--experts 0`` stops after DUS (JAI-1 then trains the dense
model and seeds the experts from snapshots with ``tools/upscale.py moe --in S0 S2K S4K S6K``).
"""
from __future__ import annotations

import argparse
import os
import shutil
import time

from megatron_jai.paths import shared_path

RECIPES = ("jai",)
STAGES = ("convert", "tokenizer", "vocab", "dus", "moe")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", choices=RECIPES, help="recipe to run (jai: JAI-1's tokenizer -> vocab "
                                                   "-> DUS.v2 -> MoE chain)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--hf-dir", help="Hugging Face Phi-3 directory (config.json + safetensors)")
    src.add_argument("--in", dest="src", help="start from this checkpoint of ours (skips convert)")
    p.add_argument("--out", required=True, help="final checkpoint root")
    tok = p.add_argument_group("tokenizer")
    tok.add_argument("--thai-corpus", nargs="+", default=None,
                     help="Thai text (.jsonl[.gz] with a 'text' field, or plain .txt) to train the "
                          "Thai BPE on")
    tok.add_argument("--tokenizer", help="a prepared extended tokenizer directory "
                                         "(tools/extend_tokenizer.py output): skips training")
    tok.add_argument("--base-tokenizer", default=shared_path("tokenizers", "phi3"),
                     help="the base model's tokenizer (default: %(default)s)")
    tok.add_argument("--thai-vocab", type=int, default=40000,
                     help="pieces of the Thai BPE (default: %(default)s)")
    tok.add_argument("--target-vocab", type=int, default=64000,
                     help="ids of the merged tokenizer (default: %(default)s)")
    tok.add_argument("--max-sentences", type=int, default=2_000_000,
                     help="sentences sampled for BPE training (default: %(default)s)")
    tok.add_argument("--norm-correction", action="store_true",
                     help="vocab: rescale new embedding rows to the mean base-row norm")
    g = p.add_argument_group("depth and experts")
    g.add_argument("--plan", default="phi3-medium-jai",
                   help="DUS plan name or YAML/JSON file (default: %(default)s)")
    g.add_argument("--experts", type=int, default=4, help="experts per layer; 0 = stop after DUS "
                                                          "(default: %(default)s)")
    g.add_argument("--top-k", type=int, default=2, help="experts per token (default: %(default)s)")
    g.add_argument("--noise-std", type=float, default=0.0, help="noise on expert copies 1..E-1")
    g.add_argument("--router-std", type=float, default=None,
                   help="router init std (default: router logits of std 0.01 per layer; 0 = "
                        "exactly uniform probabilities, every token on experts 0..k-1)")
    p.add_argument("--name", default="jai", help="model name of the result (default: %(default)s)")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default=None,
                   help="convert: cast the HF weights (default: keep)")
    p.add_argument("--work-dir", help="intermediate outputs (default: OUT.work)")
    p.add_argument("--keep-work", action="store_true", help="keep the work directory afterwards")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="tokenizer training / merging threads")
    p.add_argument("--force", action="store_true",
                   help="replace an existing output and redo every stage")


def _check(args) -> None:
    if args.tokenizer is None and not args.thai_corpus:
        raise ValueError("give --thai-corpus FILE... to train the Thai tokenizer, or --tokenizer "
                         "TOK for a prepared one")
    for path in args.thai_corpus or []:
        if not os.path.isfile(path):
            raise ValueError(f"no such file: {path}")
    if args.hf_dir and not os.path.isdir(args.hf_dir):
        raise ValueError(f"no such directory: {args.hf_dir}")
    if args.experts == 1 or args.experts < 0:
        raise ValueError("--experts must be 0 (dense) or at least 2")
    if os.path.exists(args.out) and not args.force:
        raise ValueError(f"output {args.out} already exists (use --force to replace it)")


SETTINGS_FILE = "recipe_settings.json"


def _check_work_settings(work: str, args, plan) -> None:
    """Reusing stage outputs is only safe when they were made with the same settings."""
    import json

    settings = {
        "hf_dir": args.hf_dir and os.path.abspath(args.hf_dir),
        "src": args.src and os.path.abspath(args.src),
        "thai_corpus": [os.path.abspath(p) for p in args.thai_corpus or []],
        "tokenizer": args.tokenizer and os.path.abspath(args.tokenizer),
        "base_tokenizer": os.path.abspath(args.base_tokenizer), "thai_vocab": args.thai_vocab,
        "target_vocab": args.target_vocab, "max_sentences": args.max_sentences,
        "norm_correction": args.norm_correction, "dtype": args.dtype, "plan": plan.to_dict(),
        "name": args.name,
    }
    path = os.path.join(work, SETTINGS_FILE)
    if os.path.isfile(path):
        with open(path) as f:
            old = json.load(f)
        changed = sorted(k for k in settings if old.get(k) != settings[k])
        if changed:
            raise ValueError(f"work directory {work} holds stages made with other settings "
                             f"({', '.join(changed)}); use --force or another --work-dir")
        return
    with open(path + ".tmp", "w") as f:
        json.dump(settings, f, indent=2)
    os.replace(path + ".tmp", path)


def run(args, log=print) -> dict:
    """Run the recipe; returns a summary dict (the final config under ``config``)."""
    from megatron_jai.checkpoint.stream import CheckpointReader
    from megatron_jai.upscale.plan import load_plan

    _check(args)
    plan = load_plan(args.plan)  # fail on a bad plan before hours of work
    work = os.path.abspath(args.work_dir or args.out.rstrip("/") + ".work")
    if args.force and os.path.isdir(work):
        shutil.rmtree(work)
    os.makedirs(work, exist_ok=True)
    _check_work_settings(work, args, plan)
    paths = {s: os.path.join(work, f"{i}-{s}") for i, s in enumerate(STAGES)}
    skipped = {"convert": bool(args.src), "tokenizer": args.tokenizer is not None,
               "moe": args.experts == 0}
    stages = [s for s in STAGES if not skipped.get(s)]
    final_stage = stages[-1]
    paths[final_stage] = os.path.abspath(args.out)
    seconds = {}

    def stage(name, what, fn, done_marker=None):
        i = stages.index(name) + 1
        out = paths[name]
        marker = os.path.join(out, done_marker) if done_marker else out
        if os.path.exists(marker) and not (name == final_stage):
            log(f"[{i}/{len(stages)}] {name}: reusing {out}")
            return
        log(f"[{i}/{len(stages)}] {name}: {what}")
        t0 = time.time()
        fn(out)
        seconds[name] = time.time() - t0

    ckpt = os.path.abspath(args.src) if args.src else paths["convert"]
    if args.hf_dir:
        from megatron_jai.checkpoint.convert import DTYPES, hf_to_mcore

        stage("convert", f"HF {args.hf_dir} -> {paths['convert']}",
              lambda out: log("    " + hf_to_mcore(args.hf_dir, out, name=f"{args.name}-base",
                                                    dtype=DTYPES.get(args.dtype)).line()))

    tokenizer = args.tokenizer
    if tokenizer is None:
        from megatron_jai.upscale.tokenizer import extend_tokenizer, train_bpe

        tokenizer = paths["tokenizer"]
        thai_dir = os.path.join(work, "thai-bpe")

        def make_tokenizer(out):
            r = train_bpe(args.thai_corpus, args.thai_vocab, thai_dir, threads=args.threads,
                          max_sentences=args.max_sentences, verbose=False, force=True)
            log(f"    Thai BPE: {r.vocab_size} pieces from {r.sentences} sentences "
                f"({r.characters} chars) in {r.seconds:.1f}s")
            e = extend_tokenizer(args.base_tokenizer, thai_dir, args.target_vocab, out,
                                 threads=args.threads, force=True)
            log(f"    merged: {e.base_vocab} + {e.added} -> {e.vocab_size} ids "
                f"({e.dropped_unreachable} unreachable pieces dropped)")

        stage("tokenizer", f"train a {args.thai_vocab}-piece Thai BPE, merge to "
              f"{args.target_vocab} ids", make_tokenizer, done_marker="vocab_map.json")

    from megatron_jai.upscale.vocab import extend_vocab

    def vocab(out):
        s = extend_vocab(ckpt, tokenizer, out, base_tokenizer=args.base_tokenizer,
                         norm_correction=args.norm_correction, name=f"{args.name}-vocab",
                         force=args.force or out == paths[final_stage])
        log(f"    {s['base_vocab']} -> {s['vocab']} ids, {s['new_rows']} new rows")

    stage("vocab", f"embedding surgery for {tokenizer}", vocab)

    from megatron_jai.upscale.dus import depth_upscale

    def dus(out):
        s = depth_upscale(paths["vocab"], out, plan, name=f"{args.name}-dus",
                          force=args.force or out == paths[final_stage])
        log(f"    {s['base_layers']} -> {s['layers']} layers, {s['skips']} skips")

    stage("dus", plan.describe(), dus)

    if args.experts:
        from megatron_jai.upscale.upcycle import upcycle

        def moe(out):
            upcycle([paths["dus"]], out, args.experts, args.top_k, noise_std=args.noise_std,
                    router_std=args.router_std, name=args.name, force=True)

        stage("moe", f"{args.experts} experts, top-{args.top_k}", moe)

    cfg = CheckpointReader(args.out).config
    if not args.keep_work:
        shutil.rmtree(work, ignore_errors=True)
    counts = cfg.parameter_counts()
    return {"out": os.path.abspath(args.out), "config": cfg, "params_total": counts["total"],
            "params_active": counts["active"], "seconds": seconds,
            "work": work if args.keep_work else None}


def human_count(n: float) -> str:
    """1234567 -> '1.235M' (parameter counts in summaries)."""
    for unit in ("", "K", "M", "B", "T"):
        if abs(n) < 1000:
            return f"{n:.4g}{unit}"
        n /= 1000
    return f"{n:.4g}P"


def main(args) -> int:
    t0 = time.time()
    s = run(args)
    cfg = s["config"]
    moe = f", {cfg.num_experts} experts top-{cfg.moe_top_k}" if cfg.is_moe else ", dense"
    print(f"recipe {args.recipe}: {cfg.num_layers} layers ({len(cfg.skip_connections)} skips){moe}, "
          f"vocab {cfg.vocab_size} (padded {cfg.padded_vocab_size}), parameters "
          f"{human_count(s['params_total'])} total / {human_count(s['params_active'])} active, "
          f"wrote {s['out']} in {time.time() - t0:.1f}s")
    return 0
