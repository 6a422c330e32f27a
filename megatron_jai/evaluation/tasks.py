"""The evaluation tasks and how each one runs on a :class:`~megatron_jai.inference.lm.LanguageModel`.

=================  ======================================================================
kind               tasks
=================  ======================================================================
bits               ``thai_valid``, ``thai_test``, ``english_valid``, ``english_test``,
                   ``ntrex_tha``, ``ntrex_eng`` (shared data), or any ``--text FILE``:
                   bits per character / byte, token perplexity (:mod:`.scoring`)
translation        ``ntrex_en_th``, ``ntrex_th_en``: few-shot prompt, greedy decoding to the end
                   of the line, corpus chrF (sacrebleu) on a fixed subset of NTREX-128
qa                 ``iapp_qa``: iApp wiki QA valid split, greedy answer to the end of the line,
                   exact match and token F1 with the Thai-aware normaliser (:mod:`.metrics`)
lm-eval            ``lm-eval:NAME``: lm-evaluation-harness (Hugging Face backend, Hugging Face
                   directories only) on the local task YAMLs of ``lm_eval_tasks/``
=================  ======================================================================

Groups: ``bits`` (the six text inputs), ``translation``, ``all`` (everything but lm-eval).
NTREX-128 and the iApp valid split are evaluation data: never train or tune on them.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from typing import List, Optional

from megatron_jai.cli import UserError
from megatron_jai.paths import shared_path

LM_EVAL_TASK_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lm_eval_tasks")
LM_EVAL_PREFIX = "lm-eval:"

TEXT_INPUTS = {
    "thai_valid": "data/thai/thaigov_v2.valid.jsonl.gz",
    "thai_test": "data/thai/thaigov_v2.test.jsonl.gz",
    "english_valid": "data/english/enwiki.valid.jsonl.gz",
    "english_test": "data/english/enwiki.test.jsonl.gz",
    "ntrex_tha": "data/eval/ntrex128.tha.txt",
    "ntrex_eng": "data/eval/ntrex128.eng.txt",
}
NTREX = {"en": "data/eval/ntrex128.eng.txt", "th": "data/eval/ntrex128.tha.txt"}
LANGUAGE_NAMES = {"en": "English", "th": "Thai"}
TRANSLATION = {"ntrex_en_th": ("en", "th"), "ntrex_th_en": ("th", "en")}
IAPP_QA = "data/post/th_sft_iapp_wiki_qa_valid.jsonl.gz"
GROUPS = {"bits": list(TEXT_INPUTS), "translation": list(TRANSLATION),
          "all": [*TEXT_INPUTS, *TRANSLATION, "iapp_qa"]}

NTREX_SUBSET = 100  # translation items: evenly spaced NTREX lines after the few-shot examples
QA_ANSWER_CUE = "\n\nคำตอบ:"  # "answer:", after the instruction, article and question


@dataclass
class Task:
    name: str
    kind: str  # bits, translation, qa, lm-eval
    path: Optional[str] = None
    options: dict = field(default_factory=dict)


def lm_eval_task_names(extra_dirs=()) -> List[str]:
    """Task names defined by the YAML files of our task folder (and ``extra_dirs``)."""
    names = []
    for d in [LM_EVAL_TASK_DIR, *extra_dirs]:
        if not os.path.isdir(d):
            raise UserError(f"lm-eval task folder {d} does not exist")
        for root, _, files in os.walk(d):
            for fname in sorted(files):
                if fname.endswith((".yaml", ".yml")):
                    with open(os.path.join(root, fname), encoding="utf-8") as f:
                        m = re.search(r"^task:\s*['\"]?([\w.\-]+)", f.read(), re.M)
                    if m:
                        names.append(m.group(1))
    return names


def all_task_names() -> List[str]:
    return [*TEXT_INPUTS, *TRANSLATION, "iapp_qa",
            *(LM_EVAL_PREFIX + n for n in lm_eval_task_names())]


def resolve_tasks(names: List[str], texts: List[str], lm_eval_dirs=()) -> List[Task]:
    """Tasks for ``--task`` names (groups expanded, in order, without repeats) and ``--text``
    files; every file is checked here, before a model is loaded."""
    expanded: List[str] = []
    for name in names:
        for n in GROUPS.get(name, [name]):
            if n not in expanded:
                expanded.append(n)
    tasks: List[Task] = []
    local_lm_eval = None
    for name in expanded:
        if name in TEXT_INPUTS:
            tasks.append(Task(name, "bits", shared_path(TEXT_INPUTS[name])))
        elif name in TRANSLATION:
            tasks.append(Task(name, "translation", None, {"pair": TRANSLATION[name]}))
        elif name == "iapp_qa":
            tasks.append(Task(name, "qa", shared_path(IAPP_QA)))
        elif name.startswith(LM_EVAL_PREFIX):
            local_lm_eval = local_lm_eval or lm_eval_task_names(lm_eval_dirs)
            sub = name[len(LM_EVAL_PREFIX):]
            if sub not in local_lm_eval:
                raise UserError(f"unknown lm-eval task {sub!r}; the local tasks are "
                                f"{', '.join(local_lm_eval)} (only local tasks run: no hub access)")
            tasks.append(Task(name, "lm-eval", None, {"task": sub}))
        else:
            raise UserError(f"unknown task {name!r}; choose from {', '.join(all_task_names())} "
                            f"or the groups {', '.join(GROUPS)} (see --list-tasks)")
    used = {t.name for t in tasks}
    for path in texts:
        name = os.path.basename(path)
        while name in used:
            name = "_" + name
        used.add(name)
        tasks.append(Task(name, "bits", path))
    for t in tasks:
        paths = [t.path] if t.path else []
        if t.kind == "translation":
            paths = [shared_path(NTREX[lang]) for lang in t.options["pair"]]
        for p in paths:
            if not os.path.isfile(p):
                raise UserError(f"task {t.name}: no such file {p} (set JAI_SHARED_DIR?)")
    if not tasks:
        raise UserError("no task: give --task NAME or --text FILE")
    return tasks


# ---- translation -------------------------------------------------------------------------------
def ntrex_lines(lang: str) -> List[str]:
    with open(shared_path(NTREX[lang]), encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f]


def ntrex_subset(num_lines: int, shots: int, size: int = NTREX_SUBSET) -> List[int]:
    """Test items: ``size`` evenly spaced line numbers after the ``shots`` few-shot lines."""
    span = num_lines - shots
    return [shots + (i * span) // size for i in range(min(size, span))]


def translation_prompt(src_lang: str, tgt_lang: str, shots: List[tuple], source: str) -> str:
    """``English: ...\\nThai: ...`` pairs separated by blank lines, then the source and the cue."""
    a, b = LANGUAGE_NAMES[src_lang], LANGUAGE_NAMES[tgt_lang]
    blocks = [f"{a}: {s}\n{b}: {t}" for s, t in shots]
    return "\n\n".join(blocks + [f"{a}: {source}\n{b}:"])


def translation_chat_message(src_lang: str, tgt_lang: str, source: str) -> str:
    return (f"Translate this {LANGUAGE_NAMES[src_lang]} text into {LANGUAGE_NAMES[tgt_lang]}. "
            f"Reply with the translation only.\n\n{source}")


# ---- question answering ------------------------------------------------------------------------
def read_qa(path: str, limit: Optional[int] = None) -> List[dict]:
    """``{"question": user turn, "answer": assistant turn}`` records of a chat JSON-lines file."""
    from megatron_jai.data.files import iter_lines

    items = []
    for lineno, (raw, _) in enumerate(iter_lines(path), 1):
        if not raw.strip():
            continue
        try:
            messages = json.loads(raw)["messages"]
            user = next(m["content"] for m in messages if m["role"] == "user")
            answer = next(m["content"] for m in reversed(messages) if m["role"] == "assistant")
        except (ValueError, KeyError, TypeError, StopIteration):
            raise UserError(f"{path}:{lineno}: not a chat record with a user and an assistant "
                            f"turn") from None
        items.append({"question": user, "answer": answer})
        if limit is not None and len(items) >= limit:
            break
    return items
