#!/usr/bin/env python
"""Generate text from a Megatron checkpoint (any TP/PP/EP) or a Hugging Face directory.

  python tools/generate.py --load CKPT --prompt "สวัสดี" [--max-new-tokens 128]
  python tools/generate.py --load CKPT --chat                 # interactive, the chat template
  torchrun --nproc_per_node 4 tools/generate.py --load CKPT --tp 2 --pp 2 --prompt TEXT

Greedy by default; --temperature T (> 0) samples, with --top-p / --top-k. Stops at the end of
document / <|end|> tokens or after --max-new-tokens. Megatron-Core's KV cache is on unless
--no-kv-cache. The text goes to stdout as it is generated; the summary line (tokens/s) to stderr.
The tokenizer is the checkpoint's (<ckpt>/tokenizer) unless --tokenizer is given.
See docs/evaluation.md.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_jai import cli  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", required=True, help="Megatron checkpoint (root or iter_*) or HF directory")
    p.add_argument("--tokenizer", default=None, help="tokenizer (default: the one the model carries)")
    p.add_argument("--prompt", default=None, help="text to continue (with --chat: one user turn)")
    p.add_argument("--chat", action="store_true",
                   help="chat through the tokenizer's chat template (interactive without --prompt)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate at most")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely (0 = all)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (the same on every rank)")
    p.add_argument("--no-kv-cache", action="store_true", help="recompute the whole sequence each step")
    cli.add_layout_arguments(p)
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None,
                   help="compute dtype (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--output", default=None,
                   help="also write a JSON file: prompt and generated ids, text, tokens/s")
    return p


def _prompt_ids(lm, text: str, chat: bool, history: list) -> list:
    from megatron_jai.inference.chat import chat_prompt_ids

    if not chat:
        ids = lm.tokenizer.encode(text)
    else:
        history.append({"role": "user", "content": text})
        ids = chat_prompt_ids(lm.tokenizer, history)
    if not ids:
        raise cli.UserError("the prompt is empty")
    if len(ids) >= lm.context_length:
        raise cli.UserError(f"the prompt has {len(ids)} tokens but the model's context is "
                            f"{lm.context_length}: nothing can be generated")
    return ids


def _read_turn(lm):
    """The next user line (read on rank 0, shared with every rank); None at the end."""
    import torch.distributed as dist

    text = None
    if lm.is_main:
        try:
            text = input("user> ")
        except EOFError:
            text = None
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [text]
        dist.broadcast_object_list(box, src=0)
        text = box[0]
    return text if text and text.strip() else None


def _generate(lm, ids, params, stop, use_cache):
    from megatron_jai.inference.generation import TextStream

    stream = TextStream(lm.tokenizer, stop)

    def show(tok):
        if lm.is_main:
            sys.stdout.write(stream.push(tok))
            sys.stdout.flush()

    gen = lm.generate(ids, params, stop, use_cache=use_cache, on_token=show)
    if lm.is_main:
        sys.stdout.write(stream.finish() + "\n")
        sys.stdout.flush()
    return gen


def _summary(gen, use_cache: bool) -> str:
    prefill = "" if gen.prefill_seconds != gen.prefill_seconds else \
        f"; prefill {len(gen.prompt_ids)} tokens in {gen.prefill_seconds:.2f}s"
    return (f"generate: {len(gen.ids)} tokens in {gen.seconds:.2f}s: {gen.tokens_per_second:.1f} "
            f"tokens/s (KV cache {'on' if use_cache else 'off'}{prefill}), stop: {gen.stop_reason}")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from megatron_jai.inference.generation import (
        SamplingParams,
        StopCondition,
        completion_text,
        stop_token_ids,
    )
    from megatron_jai.inference.lm import load_language_model

    if args.prompt is None and not args.chat:
        raise cli.UserError("give --prompt TEXT or --chat")
    if args.prompt is not None and not args.prompt.strip():
        raise cli.UserError("the prompt is empty")
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                            top_p=args.top_p, top_k=args.top_k, seed=args.seed)
    if args.output and not os.path.isdir(os.path.dirname(os.path.abspath(args.output))):
        raise cli.UserError(f"--output: folder {os.path.dirname(os.path.abspath(args.output))} "
                            f"does not exist")
    use_cache = not args.no_kv_cache
    lm = load_language_model(args.load, args.tokenizer, tp=args.tp, pp=args.pp, ep=args.ep,
                             dtype=args.dtype, first_stage_layers=args.first_stage_layers,
                             last_stage_layers=args.last_stage_layers)
    try:
        stop = StopCondition(stop_token_ids(lm.tokenizer))
        history: list = []
        turns = []
        text = args.prompt if args.prompt is not None else _read_turn(lm)
        while text is not None:
            ids = _prompt_ids(lm, text, args.chat, history)
            gen = _generate(lm, ids, params, stop, use_cache)
            reply = completion_text(lm.tokenizer, gen, stop)
            turns.append({"prompt": text, "prompt_ids": gen.prompt_ids, "ids": gen.ids,
                          "text": reply, "stop_reason": gen.stop_reason,
                          "tokens_per_second": gen.tokens_per_second})
            if lm.is_main:
                print(_summary(gen, use_cache), file=sys.stderr, flush=True)
            if args.prompt is not None:
                break
            history.append({"role": "assistant", "content": reply})
            text = _read_turn(lm)
        if args.output and lm.is_main:
            tmp = f"{args.output}.tmp{os.getpid()}"
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump({"model": lm.describe(), "params": params.__dict__,
                           "kv_cache": use_cache, "turns": turns}, f, ensure_ascii=False, indent=1)
            os.replace(tmp, args.output)
    finally:
        lm.close()
    return 0


if __name__ == "__main__":
    from megatron_jai.inference.lm import USER_ERRORS

    sys.exit(cli.run("generate.py", main, user_errors=USER_ERRORS))
