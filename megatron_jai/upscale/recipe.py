"""The JAI-1 upscaling recipe in one command (``tools/upscale.py recipe jai``).

Stages, each writing a complete checkpoint (or tokenizer) under a work directory::

    1 convert    HF Phi-3 -> our checkpoint                  (megatron_jai.checkpoint.convert)
    2 tokenizer  Thai sentencepiece BPE + merge into Phi-3's   (megatron_jai.upscale.tokenizer)
    3 vocab      embedding / output rows for the new ids       (megatron_jai.upscale.vocab)
    4 dus        DUS.v2 depth up-scaling along a plan          (megatron_jai.upscale.dus)
    5 moe        every FFN -> E experts, router near uniform   (megatron_jai.upscale.upcycle)

Everything that can be checked without doing the work is checked before stage 1 (inputs, the plan
against the base model's depth, experts and top-k, vocabulary sizes): a mistake costs seconds,
not hours of tokenizer training. Each finished stage records its inputs (options, and the identity
of its input files or of the stage before it) in ``WORK/<stage>.json``; a rerun reuses every stage
whose inputs are unchanged and redoes the rest, so correcting the plan redoes only ``dus`` and
``moe``. ``--fresh`` discards the work directory first. ``--in CKPT`` starts from one of our
checkpoints instead of an HF directory, ``--tokenizer TOK`` uses a prepared extended tokenizer
instead of training one, and ``--experts 0`` stops after DUS (JAI-1 then trains the dense model and
seeds the experts from snapshots with ``tools/upscale.py moe --in S0 S2K S4K S6K --shared-from
last``). The tokenizer is trained with the options of the README's separate steps (``train_tokenizer.py --clean thaigov``
and its defaults), so both give the same tokenizer.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import time

from megatron_jai.cli import UserError
from megatron_jai.paths import shared_path

RECIPES = ("jai",)
STAGES = ("convert", "tokenizer", "vocab", "dus", "moe")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from megatron_jai.upscale.tokenizer import CLEANERS

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
    tok.add_argument("--base-tokenizer", default=None,
                     help="the base model's tokenizer (default: the sentencepiece tokenizer of "
                          "--hf-dir, or the one the --in checkpoint carries, else Phi-3's)")
    tok.add_argument("--thai-vocab", type=int, default=40000,
                     help="pieces of the Thai BPE (default: %(default)s)")
    tok.add_argument("--target-vocab", type=int, default=64000,
                     help="ids of the merged tokenizer (default: %(default)s)")
    tok.add_argument("--max-sentences", type=int, default=2_000_000,
                     help="sentences sampled for BPE training (default: %(default)s)")
    tok.add_argument("--clean", choices=sorted(CLEANERS), default="thaigov",
                     help="drop page boilerplate before BPE training, as train_tokenizer.py --clean "
                          "(default: %(default)s, the README's choice for the thaigov corpus)")
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
    p.add_argument("--work-dir", help="intermediate outputs (default: OUT.work); stages whose "
                                      "inputs are unchanged are reused from there")
    p.add_argument("--keep-work", action="store_true", help="keep the work directory afterwards")
    p.add_argument("--fresh", action="store_true",
                   help="discard the work directory first: redo every stage")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="tokenizer training / merging threads")
    p.add_argument("--force", action="store_true", help="replace an existing output")


def check(args):
    """Every check that needs no stage to have run, before stage 1. Returns (base model config,
    DUS plan)."""
    from megatron_jai.checkpoint.convert import read_hf_config
    from megatron_jai.checkpoint.formats import model_config_from_hf
    from megatron_jai.checkpoint.stream import CheckpointReader
    from megatron_jai.data.hf_tokenizer import load_base_tokenizer
    from megatron_jai.upscale.dus import dus_config
    from megatron_jai.upscale.plan import load_plan
    from megatron_jai.upscale.tokenizer import SP_MODEL_FILE, check_bpe_options, load_vocab_map
    from megatron_jai.upscale.upcycle import moe_config
    from megatron_jai.upscale.vocab import checkpoint_base_tokenizer

    if os.path.exists(args.out) and not args.force:
        raise UserError(f"output {args.out} already exists (use --force to replace it)")
    if args.hf_dir:
        base = model_config_from_hf(read_hf_config(args.hf_dir), name=f"{args.name}-base")
        own = args.hf_dir if os.path.isfile(os.path.join(args.hf_dir, SP_MODEL_FILE)) else None
    else:
        reader = CheckpointReader(args.src)
        base, own = reader.config, checkpoint_base_tokenizer(reader.root)
    args.base_tokenizer = args.base_tokenizer or own or shared_path("tokenizers", "phi3")
    base_vocab = load_base_tokenizer(args.base_tokenizer).vocab_size
    if args.tokenizer is None:
        if not args.thai_corpus:
            raise UserError("give --thai-corpus FILE... to train the Thai tokenizer, or "
                            "--tokenizer TOK for a prepared one")
        for path in args.thai_corpus:
            if not os.path.isfile(path):
                raise UserError(f"Thai corpus {path} does not exist")
        check_bpe_options(args.thai_vocab, args.clean)
        if args.target_vocab <= base_vocab:
            raise UserError(f"--target-vocab {args.target_vocab} must exceed the base tokenizer's "
                            f"{base_vocab} ids")
        mapped = base_vocab
    else:
        mapped = len(load_vocab_map(args.tokenizer)["old_to_new"])
        if mapped != base_vocab:
            raise UserError(f"--tokenizer {args.tokenizer} was extended from a {mapped}-id "
                            f"tokenizer, --base-tokenizer {args.base_tokenizer} has {base_vocab}")
    if mapped > base.vocab_size:
        raise UserError(f"the base tokenizer has {mapped} ids, but the base model only "
                        f"{base.vocab_size} embedding rows")
    plan = load_plan(args.plan)
    dense = dus_config(base, plan)  # the plan against the base model's depth
    if args.experts:
        moe_config(dense, args.experts, args.top_k)
    elif args.experts < 0:
        raise UserError("--experts must be 0 (dense) or at least 2")
    if args.noise_std < 0 or (args.router_std is not None and args.router_std < 0):
        raise UserError("--noise-std and --router-std must be >= 0")
    return base, plan


def _identity(path: str) -> dict:
    """What a stage's external input is, cheaply: its path, and every file's size and mtime."""
    path = os.path.abspath(path)
    if os.path.isfile(path):
        st = os.stat(path)
        return {"path": path, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    files = []
    for root, dirs, names in os.walk(path):
        dirs.sort()
        for name in sorted(names):
            st = os.stat(os.path.join(root, name))
            files.append([os.path.relpath(os.path.join(root, name), path), st.st_size,
                          st.st_mtime_ns])
    return {"path": path, "files": files}


def _digest(inputs: dict) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


def run(args, log=print) -> dict:
    """Run the recipe; returns a summary dict (the final config under ``config``)."""
    from megatron_jai.checkpoint.stream import CheckpointReader

    base, plan = check(args)
    work = os.path.abspath(args.work_dir or args.out.rstrip("/") + ".work")
    if args.fresh and os.path.isdir(work):
        shutil.rmtree(work)
    os.makedirs(work, exist_ok=True)
    paths = {s: os.path.join(work, f"{i}-{s}") for i, s in enumerate(STAGES)}
    skipped = {"convert": bool(args.src), "tokenizer": args.tokenizer is not None,
               "moe": args.experts == 0}
    stages = [s for s in STAGES if not skipped.get(s)]
    final_stage = stages[-1]
    paths[final_stage] = os.path.abspath(args.out)
    seconds, digests = {}, {}

    def stage(name, what, inputs, fn):
        """Run ``fn(out)`` unless the work directory holds this stage made from the same inputs."""
        i = stages.index(name) + 1
        out, manifest = paths[name], os.path.join(work, f"{name}.json")
        digests[name] = _digest(inputs)
        if name != final_stage and os.path.exists(out) and os.path.isfile(manifest):
            with open(manifest) as f:
                if json.load(f) == inputs:
                    log(f"[{i}/{len(stages)}] {name}: reusing {out}")
                    return
        log(f"[{i}/{len(stages)}] {name}: {what}")
        if os.path.exists(manifest):
            os.remove(manifest)
        t0 = time.time()
        fn(out)
        seconds[name] = time.time() - t0
        if name != final_stage:
            with open(manifest + ".tmp", "w") as f:
                json.dump(inputs, f, indent=1)
            os.replace(manifest + ".tmp", manifest)

    if args.hf_dir:
        from megatron_jai.checkpoint.convert import DTYPES, hf_to_mcore

        stage("convert", f"HF {args.hf_dir} -> {paths['convert']}",
              {"hf_dir": _identity(args.hf_dir), "dtype": args.dtype, "name": base.name},
              lambda out: log("    " + hf_to_mcore(args.hf_dir, out, name=base.name, force=True,
                                                    dtype=DTYPES.get(args.dtype)).line()))
        checkpoint = {"stage": digests["convert"]}
    else:
        checkpoint = _identity(args.src)
    ckpt = os.path.abspath(args.src) if args.src else paths["convert"]

    tokenizer = args.tokenizer
    if tokenizer is None:
        from megatron_jai.upscale.tokenizer import extend_tokenizer, train_bpe

        tokenizer = paths["tokenizer"]
        thai_dir = os.path.join(work, "thai-bpe")

        def make_tokenizer(out):
            r = train_bpe(args.thai_corpus, args.thai_vocab, thai_dir, threads=args.threads,
                          max_sentences=args.max_sentences, clean=args.clean, verbose=False,
                          force=True)
            log(f"    Thai BPE: {r.vocab_size} pieces from {r.sentences} sentences "
                f"({r.characters} chars) in {r.seconds:.1f}s")
            e = extend_tokenizer(args.base_tokenizer, thai_dir, args.target_vocab, out,
                                 threads=args.threads, force=True)
            log(f"    merged: {e.base_vocab} + {e.added} -> {e.vocab_size} ids "
                f"({e.dropped_unreachable} unreachable pieces dropped)")

        stage("tokenizer", f"train a {args.thai_vocab}-piece Thai BPE, merge to "
              f"{args.target_vocab} ids",
              {"thai_corpus": [_identity(p) for p in args.thai_corpus],
               "base_tokenizer": _identity(args.base_tokenizer), "thai_vocab": args.thai_vocab,
               "target_vocab": args.target_vocab, "max_sentences": args.max_sentences,
               "clean": args.clean}, make_tokenizer)
        tokenizer_identity = {"stage": digests["tokenizer"]}
    else:
        tokenizer_identity = _identity(tokenizer)

    from megatron_jai.upscale.vocab import extend_vocab

    def vocab(out):
        s = extend_vocab(ckpt, tokenizer, out, base_tokenizer=args.base_tokenizer,
                         norm_correction=args.norm_correction, name=f"{args.name}-vocab",
                         force=True)
        log(f"    {s['base_vocab']} -> {s['vocab']} ids, {s['new_rows']} new rows")

    stage("vocab", f"embedding surgery for {tokenizer}",
          {"checkpoint": checkpoint, "tokenizer": tokenizer_identity,
           "base_tokenizer": _identity(args.base_tokenizer),
           "norm_correction": args.norm_correction, "name": args.name}, vocab)

    from megatron_jai.upscale.dus import depth_upscale

    def dus(out):
        s = depth_upscale(paths["vocab"], out, plan, name=f"{args.name}-dus", force=True)
        log(f"    {s['base_layers']} -> {s['layers']} layers, {s['skips']} skips")

    stage("dus", plan.describe(), {"checkpoint": {"stage": digests["vocab"]},
                                   "plan": plan.to_dict(), "name": args.name}, dus)

    if args.experts:
        from megatron_jai.upscale.upcycle import upcycle

        def moe(out):
            upcycle([paths["dus"]], out, args.experts, args.top_k, noise_std=args.noise_std,
                    router_std=args.router_std, name=args.name, force=True)

        stage("moe", f"{args.experts} experts, top-{args.top_k}",
              {"checkpoint": {"stage": digests["dus"]}, "experts": args.experts,
               "top_k": args.top_k, "noise_std": args.noise_std, "router_std": args.router_std,
               "name": args.name}, moe)

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
