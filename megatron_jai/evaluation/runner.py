"""Run evaluation tasks (:mod:`.tasks`) on a language model and collect one result dict per task."""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from typing import List, Optional

from megatron_jai.cli import UserError
from megatron_jai.evaluation import metrics
from megatron_jai.evaluation.scoring import read_texts, score_documents
from megatron_jai.evaluation.tasks import (
    QA_ANSWER_CUE,
    Task,
    ntrex_lines,
    ntrex_subset,
    read_qa,
    translation_chat_message,
    translation_prompt,
)
from megatron_jai.inference.chat import chat_prompt_ids
from megatron_jai.inference.generation import (
    SamplingParams,
    StopCondition,
    completion_text,
    stop_token_ids,
)

DEFAULT_MAX_NEW_TOKENS = {"translation": 256, "qa": 64}


@dataclass
class EvalOptions:
    limit: Optional[int] = None  # documents / items per task
    batch_size: int = 4  # scoring windows per forward pass (lm-eval: its batch size)
    context: Optional[int] = None  # scoring window (default: the model's context)
    stride: Optional[int] = None  # see megatron_jai.evaluation.scoring
    shots: int = 3  # translation examples in the prompt
    max_new_tokens: Optional[int] = None  # generation tasks (default per kind)
    chat: bool = False  # generation tasks through the chat template, zero-shot
    text_key: str = "text"
    progress: bool = True
    lm_eval_dirs: tuple = ()
    score_vocab: Optional[int] = None  # bits: probabilities over the first N ids only

    def __post_init__(self):
        for name in ("limit", "batch_size", "context", "stride", "max_new_tokens", "score_vocab"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
        if self.shots < 0:
            raise UserError(f"--shots must be >= 0, got {self.shots}")

    def as_dict(self) -> dict:
        d = asdict(self)
        d.pop("progress")
        d["lm_eval_dirs"] = list(self.lm_eval_dirs)
        return d


def _bar(lm, opts: EvalOptions, total: int, desc: str):
    from megatron_jai.cli import progress

    return progress(total=total, desc=desc, unit="item", enabled=opts.progress and lm.is_main)


def run_task(lm, task: Task, opts: EvalOptions) -> dict:
    runner = {"bits": run_bits, "translation": run_translation, "qa": run_qa,
              "lm-eval": run_lm_eval}[task.kind]
    return {"kind": task.kind, **runner(lm, task, opts)}


def run_bits(lm, task: Task, opts: EvalOptions) -> dict:
    texts = read_texts(task.path, opts.text_key, opts.limit)
    context = min(opts.context or lm.context_length, lm.context_length)
    routing = getattr(lm, "expert_load", None)  # MoE checkpoints: the routing of this text
    if routing:
        routing()
    with _bar(lm, opts, len(texts), task.name) as bar:
        tally = score_documents(lm, texts, context, opts.stride, opts.batch_size, progress=bar,
                                vocab=opts.score_vocab)
    load = routing() if routing else None
    return {"file": os.path.abspath(task.path), "context": context,
            "stride": opts.stride or context - 1, **tally.metrics(),
            **({"expert_load": load} if load else {})}


def _generate_answers(lm, prompts: List[list], opts: EvalOptions, kind: str, desc: str):
    """Greedy one-line answers; prompts that leave no room in the context are skipped (None)."""
    params = SamplingParams(max_new_tokens=opts.max_new_tokens or DEFAULT_MAX_NEW_TOKENS[kind])
    stop = StopCondition(stop_token_ids(lm.tokenizer), text="\n")
    answers, new_tokens, seconds = [], 0, 0.0
    with _bar(lm, opts, len(prompts), desc) as bar:
        for ids in prompts:
            if len(ids) >= lm.context_length:
                answers.append(None)
            else:
                gen = lm.generate(ids, params, stop)
                answers.append(completion_text(lm.tokenizer, gen, stop))
                new_tokens += len(gen.ids)
                seconds += gen.seconds
            bar.update(1)
    return answers, {"generated_tokens": new_tokens,
                     "tokens_per_second": new_tokens / seconds if seconds else float("nan")}


def _prompt_ids(lm, text: str, opts: EvalOptions) -> list:
    if opts.chat:
        return chat_prompt_ids(lm.tokenizer, [{"role": "user", "content": text}])
    return lm.tokenizer.encode(text)


def run_translation(lm, task: Task, opts: EvalOptions) -> dict:
    src_lang, tgt_lang = task.options["pair"]
    src, tgt = ntrex_lines(src_lang), ntrex_lines(tgt_lang)
    if len(src) != len(tgt):
        raise UserError(f"NTREX files are not line-aligned ({len(src)} vs {len(tgt)} lines)")
    shots = 0 if opts.chat else opts.shots
    items = ntrex_subset(len(src), shots)[: opts.limit]
    examples = [(src[i], tgt[i]) for i in range(shots)]
    prompts = []
    for i in items:
        if opts.chat:
            prompts.append(_prompt_ids(lm, translation_chat_message(src_lang, tgt_lang, src[i]), opts))
        else:
            prompts.append(_prompt_ids(lm, translation_prompt(src_lang, tgt_lang, examples, src[i]), opts))
    answers, speed = _generate_answers(lm, prompts, opts, "translation", task.name)
    kept = [(a, tgt[i]) for a, i in zip(answers, items) if a is not None]
    score = metrics.chrf([a for a, _ in kept], [r for _, r in kept]) if kept else float("nan")
    return {"chrf": score, "items": len(kept), "skipped": len(items) - len(kept), "shots": shots,
            "lines": items,
            "examples": [{"line": i, "hypothesis": a, "reference": tgt[i]}
                         for a, i in list(zip(answers, items))[:3]], **speed}


def run_qa(lm, task: Task, opts: EvalOptions) -> dict:
    records = read_qa(task.path, opts.limit)
    prompts = [_prompt_ids(lm, r["question"] if opts.chat else r["question"] + QA_ANSWER_CUE, opts)
               for r in records]
    answers, speed = _generate_answers(lm, prompts, opts, "qa", task.name)
    em, f1 = [], []
    for answer, r in zip(answers, records):
        if answer is not None:
            em.append(metrics.exact_match(answer, [r["answer"]]))
            f1.append(metrics.token_f1(answer, [r["answer"]]))
    mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
    return {"exact_match": mean(em), "f1": mean(f1), "items": len(em),
            "skipped": len(records) - len(em),
            "examples": [{"answer": a, "reference": r["answer"]}
                         for a, r in list(zip(answers, records))[:3]], **speed}


def run_lm_eval(lm, task: Task, opts: EvalOptions) -> dict:
    from megatron_jai.evaluation.harness import run_lm_eval_task

    if lm.backend != "huggingface":
        raise UserError("lm-eval tasks run on Hugging Face directories: export the checkpoint "
                        "(tools/convert_checkpoint.py mcore-to-hf) and evaluate that")
    return run_lm_eval_task(lm, task.options["task"], opts)


def format_table(results: dict) -> str:
    """The printed summary: one line per task and headline metric."""
    headline = {"bits": ("bits_per_char", "bits_per_byte", "perplexity"),
                "translation": ("chrf",), "qa": ("exact_match", "f1"),
                "lm-eval": ("acc", "acc_norm")}
    rows = [("task", "metric", "value", "n")]
    for name, r in results.items():
        n = r.get("documents", r.get("items", ""))
        for metric in headline[r["kind"]]:
            if metric in r:
                value = r[metric]
                text = "nan" if isinstance(value, float) and math.isnan(value) else f"{value:.4f}"
                rows.append((name, metric, text, str(n)))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    return "\n".join("  ".join(c.ljust(w) if i < 2 else c.rjust(w)
                               for i, (c, w) in enumerate(zip(row, widths))) for row in rows)
