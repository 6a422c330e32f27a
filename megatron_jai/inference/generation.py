"""Text generation: sampling, stop conditions, and the decode loop for our Megatron-Core model.

The KV cache is Megatron-Core's own (``megatron.core.inference.contexts.StaticInferenceContext``
passed through ``GPTModel.forward``): its attention keeps keys and values per layer, RoPE is offset
by the context, and only the last position's logits are materialised. It runs on our layer spec
(local and TE), the DUS block (skips blend per position, so a one-token step sees the same blend as
a full pass; ``model.eval()`` selects the inference alpha) and the MoE layer. Megatron-Core's text
generation controllers are not used: their pipeline send/receive assumes stage outputs of width
``hidden_size``, which DUS skips crossing a stage boundary break; our loop goes through
Megatron's pipeline schedule instead (:func:`~megatron_jai.inference.forward.forward_logits`).

Across ranks: every rank runs every forward; the result rank (last stage, first TP/DP rank) samples
with a generator seeded from ``SamplingParams.seed`` and broadcasts each token with the stop flag,
so all ranks feed the same token next.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

from megatron_jai.cli import UserError

# End-of-turn / end-of-text tokens that stop generation when the tokenizer has them.
STOP_TOKENS = ("<|end|>", "<|endoftext|>", "</s>", "<|eot_id|>", "<|end_of_text|>", "<|im_end|>")


@dataclass(frozen=True)
class SamplingParams:
    """``temperature`` 0 = greedy; ``top_p`` < 1 = nucleus sampling; ``top_k`` > 0 keeps the k
    most likely tokens; ``seed`` seeds the sampler (the same on every rank)."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise UserError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise UserError(f"--temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise UserError(f"--top-k must be >= 0, got {self.top_k}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True)
class StopCondition:
    """Stop after any of ``token_ids`` (kept as the last generated id) or once the decoded
    continuation, leading whitespace aside, contains ``text`` (``"\\n"``: one-line answers)."""

    token_ids: frozenset = frozenset()
    text: Optional[str] = None

    def text_hit(self, decoded: str) -> bool:
        return bool(self.text) and self.text in decoded.lstrip()

    def cut(self, decoded: str) -> str:
        """``decoded`` up to the stop text, stripped."""
        decoded = decoded.lstrip()
        if self.text and self.text in decoded:
            decoded = decoded[: decoded.index(self.text)]
        return decoded.strip()


@dataclass
class Generation:
    prompt_ids: list
    ids: list  # the new tokens; a stop token that ended the generation is the last one
    stop_reason: str  # stop_token, stop_text, max_new_tokens or context
    prefill_seconds: float = 0.0
    seconds: float = 0.0  # the whole generation, prefill included
    extra: dict = field(default_factory=dict)

    @property
    def tokens_per_second(self) -> float:
        return len(self.ids) / self.seconds if self.seconds > 0 else float("nan")


def stop_token_ids(tokenizer, extra: Sequence[int] = ()) -> frozenset:
    """The tokenizer's end of document plus the end-of-turn tokens it has (``<|end|>`` ...)."""
    ids = {int(tokenizer.eod), *map(int, extra)}
    ids.update(int(tokenizer.special_tokens[t]) for t in STOP_TOKENS if t in tokenizer.special_tokens)
    return frozenset(ids)


def completion_text(tokenizer, gen: Generation, stop: StopCondition) -> str:
    """The decoded continuation without its stop token, cut before the stop text, stripped."""
    ids = gen.ids[:-1] if gen.stop_reason == "stop_token" else gen.ids
    return stop.cut(tokenizer.decode(ids))


def sample_token(logits: torch.Tensor, params: SamplingParams,
                 generator: Optional[torch.Generator] = None) -> int:
    """One token from the logits ``[V]`` (plain torch, fp32): greedy, or temperature, top-k and
    top-p (the smallest set of most likely tokens whose probability reaches ``top_p``)."""
    logits = logits.float()
    if params.greedy:
        return int(torch.argmax(logits))
    logits = logits / params.temperature
    if params.top_k and params.top_k < logits.numel():
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1:
        sorted_probs, order = torch.sort(probs, descending=True)
        before = torch.cumsum(sorted_probs, 0) - sorted_probs  # mass of the more likely tokens
        sorted_probs = sorted_probs.masked_fill(before >= params.top_p, 0.0)
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


def sampled_vocab_size(model_vocab: int, tokenizer) -> int:
    """Ids that generation may produce: the model's rows the tokenizer can decode."""
    return min(model_vocab, tokenizer.vocab_size) if tokenizer is not None else model_vocab


def _finished(tokenizer, new_ids: list, tok: int, stop: StopCondition) -> Optional[str]:
    if tok in stop.token_ids:
        return "stop_token"
    if stop.text and stop.text_hit(tokenizer.decode(new_ids)):
        return "stop_text"
    return None


def megatron_generate(model, tokenizer, vocab_size: int, prompt_ids: Sequence[int],
                      params: SamplingParams, stop: StopCondition, max_length: int,
                      use_cache: bool = True,
                      on_token: Optional[Callable[[int], None]] = None) -> Generation:
    """Generate from our Megatron-Core model (collective: every rank calls it with the same
    prompt). ``max_length`` bounds prompt + new tokens (the model's context). Only ids below
    ``vocab_size`` and below the tokenizer's size are sampled (Megatron's vocabulary padding and
    rows the tokenizer cannot decode never come out); ``tokenizer`` may be None without stop text."""
    from megatron.core.inference.contexts import StaticInferenceContext

    from megatron_jai.inference.forward import broadcast_from_result_rank, forward_logits, result_rank

    prompt = [int(t) for t in prompt_ids]
    vocab_size = sampled_vocab_size(vocab_size, tokenizer)
    total = min(len(prompt) + params.max_new_tokens, max_length)
    if len(prompt) >= total:
        raise UserError(f"the prompt has {len(prompt)} tokens; the model's context is {max_length}")
    device = next(model.parameters()).device
    src = result_rank()
    is_src = (torch.distributed.get_rank() if torch.distributed.is_initialized() else 0) == src
    generator = torch.Generator().manual_seed(params.seed)
    context = StaticInferenceContext(1, total) if use_cache else None
    new: list = []
    step = torch.tensor([prompt], device=device)
    start = time.perf_counter()
    prefill = None
    while True:
        logits = forward_logits(model, step, context)
        if prefill is None:
            prefill = time.perf_counter() - start
        choice = None
        if is_src:
            tok = sample_token(logits[0, -1, :vocab_size], params, generator)
            reason = _finished(tokenizer, new + [tok], tok, stop)
            if reason is None and len(new) + 1 >= params.max_new_tokens:
                reason = "max_new_tokens"
            if reason is None and len(prompt) + len(new) + 1 >= total:
                reason = "context"
            code = 0 if reason is None else _REASONS.index(reason) + 1
            choice = torch.tensor([tok, code], dtype=torch.long)
        choice = broadcast_from_result_rank(choice, src, (2,), torch.long)
        tok, code = int(choice[0]), int(choice[1])
        new.append(tok)
        if on_token is not None:
            on_token(tok)
        if code:
            break
        if use_cache:
            context.enable_decode_mode()
            step = torch.tensor([[tok]], device=device)
        else:
            step = torch.tensor([prompt + new], device=device)
    return Generation(prompt, new, _REASONS[code - 1], prefill, time.perf_counter() - start)


_REASONS = ("stop_token", "stop_text", "max_new_tokens", "context")


def hf_generate(model, tokenizer, prompt_ids: Sequence[int], params: SamplingParams,
                stop: StopCondition, max_length: int, use_cache: bool = True,
                on_token: Optional[Callable[[int], None]] = None) -> Generation:
    """The same generation through ``transformers``' ``model.generate`` (any causal LM)."""
    from transformers import (
        GenerationConfig,
        LogitsProcessor,
        LogitsProcessorList,
        StoppingCriteria,
        StoppingCriteriaList,
    )

    prompt = [int(t) for t in prompt_ids]
    max_new = min(params.max_new_tokens, max_length - len(prompt))
    if max_new < 1:
        raise UserError(f"the prompt has {len(prompt)} tokens; the model's context is {max_length}")
    n_prompt = len(prompt)

    class TextStop(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            done = stop.text_hit(tokenizer.decode(input_ids[0, n_prompt:].tolist()))
            return torch.tensor([done], dtype=torch.bool, device=input_ids.device)

    class DecodableOnly(LogitsProcessor):
        def __call__(self, input_ids, scores):
            scores[:, decodable:] = float("-inf")
            return scores

    decodable = sampled_vocab_size(model.config.vocab_size, tokenizer)

    class Streamer:
        skipped_prompt = False

        def put(self, value):
            if not self.skipped_prompt:
                self.skipped_prompt = True
                return
            for tok in value.reshape(-1).tolist():
                on_token(int(tok))

        def end(self):
            pass

    config = GenerationConfig(
        max_new_tokens=max_new, do_sample=not params.greedy, use_cache=use_cache,
        eos_token_id=sorted(stop.token_ids) or None, pad_token_id=int(tokenizer.eod),
        temperature=params.temperature if not params.greedy else None,
        top_p=params.top_p if not params.greedy else None,
        top_k=params.top_k if not params.greedy else None)
    device = next(model.parameters()).device
    ids = torch.tensor([prompt], device=device)
    if not params.greedy:
        torch.manual_seed(params.seed)
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             generation_config=config,
                             stopping_criteria=StoppingCriteriaList([TextStop()]) if stop.text else None,
                             logits_processor=LogitsProcessorList([DecodableOnly()]),
                             streamer=Streamer() if on_token is not None else None)
    seconds = time.perf_counter() - start
    new = out[0, n_prompt:].tolist()
    if new and new[-1] in stop.token_ids:
        reason = "stop_token"
    elif stop.text_hit(tokenizer.decode(new)):
        reason = "stop_text"
    elif len(new) >= params.max_new_tokens:
        reason = "max_new_tokens"
    else:
        reason = "context"
    return Generation(prompt, new, reason, float("nan"), seconds)


class TextStream:
    """Turns generated ids into printable text as they come: decodes the whole continuation and
    returns what is new, holding back a trailing partial UTF-8 character (byte-level tokens)."""

    def __init__(self, tokenizer, stop: StopCondition):
        self.tokenizer, self.stop = tokenizer, stop
        self.ids: list = []
        self.shown = ""

    def push(self, tok: int) -> str:
        if tok in self.stop.token_ids:
            return ""
        self.ids.append(tok)
        text = self.tokenizer.decode(self.ids)
        if self.stop.text_hit(text):
            text = text[: len(text) - len(text.lstrip())] + self.stop.cut(text)
        if text.endswith("\ufffd") or not text.startswith(self.shown):
            return ""
        new, self.shown = text[len(self.shown):], text
        return new

    def finish(self) -> str:
        """What is still held back once generation has ended."""
        text = self.tokenizer.decode(self.ids)
        if self.stop.text_hit(text):
            text = text[: len(text) - len(text.lstrip())] + self.stop.cut(text)
        rest = text[len(self.shown):] if text.startswith(self.shown) else ""
        self.shown = text
        return rest
