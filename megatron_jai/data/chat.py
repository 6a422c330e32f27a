"""Chat data for post-training: rendering conversations with the tokenizer's own chat template,
loss masks over the assistant turns, JSON lines -> indexed datasets, and the SFT / DPO readers.

Records (JSON lines, plain or gzip)
  * SFT: ``{"messages": [{"role", "content"}, ...]}``, roles ``system`` / ``user`` / ``assistant``.
    Messages after the last assistant turn carry no loss and are dropped.
  * DPO: ``{"prompt": [messages] (or a string: one user turn), "chosen": str, "rejected": str}``;
    ``chosen`` / ``rejected`` may be message lists instead (the continuation of the prompt; without
    ``prompt`` their longest common prefix of messages is the prompt).

Rendering (:class:`ChatTokenizer`)
  The tokenizer directory's chat template is rendered and tokenized by the same Hugging Face
  tokenizer, the one a model trained with it is exported with (a sentencepiece directory, Phi-3's
  layout, converted exactly: ``megatron_jai.data.hf_tokenizer.write_hf_tokenizer``), so the ids are
  exactly ``AutoTokenizer.from_pretrained(EXPORT).apply_chat_template(messages, tokenize=True)``,
  what TRL and serving engines feed the model: the BOS token is whatever the template writes
  (Phi-3's writes ``{{ bos_token }}``; none is added), and no generation prompt ends a sequence
  (every sequence ends with an assistant turn). A template that ignores system messages (Phi-3's)
  drops them; the tool counts the records affected.

Loss mask: an assistant turn is the text that rendering the conversation up to and including it
(``Q``) adds to rendering it up to the turn with the generation prompt (``P``); its trained span
runs from the start of its content to the end of that text without trailing whitespace: the content
and whatever closes the turn (``<|end|>`` Phi-3, ``<|im_end|>`` ChatML, ``<|eot_id|>`` Llama-3), not
the next turn's header. A token is trained when it lies inside a span, or overlaps one with a
non-whitespace character (a token straddling a span edge, e.g. ``"▁answer"`` after ``[/INST]``).
SFT trains every assistant turn; DPO only the answer (the turns after the prompt).

Too long (``seq_length``): with ``too_long="truncate"`` the oldest conversation rounds (a user turn
and what follows it, up to the next user turn) are dropped, system messages kept, until the record
fits; the final assistant turn is always kept. If its own round (its prompt and answer) still does
not fit, the sequence is cut at ``seq_length`` tokens (the answer loses its tail). With
``too_long="skip"`` such records are skipped. ``too_long="keep_start"`` is TRL's truncation: the
whole conversation is rendered and its first ``seq_length`` tokens kept (the latest turns lose
their tail, or all of it). All are counted. A record with no answer token within ``seq_length``
tokens (truncate, skip: of its final round; keep_start: of the whole conversation) is bad input
(``prompt_too_long``).

Output of :func:`preprocess_chat` (Megatron-Core indexed datasets, readable with
``megatron.core.datasets.indexed_dataset.IndexedDataset``):
  * ``PREFIX.bin/.idx``: the tokens; ``PREFIX_mask.bin/.idx``: the loss mask (uint8, 1 = trained),
    with the same sequences and documents. SFT: one document of one sequence per record. DPO: one
    document per pair with two sequences, prompt+chosen (``2i``) then prompt+rejected (``2i+1``).
  * ``PREFIX.meta.json``: kind, tokenizer (path, vocabulary, EOD, pad, chat-template hash), counts,
    options and :func:`dataset_fingerprint`.
"""
from __future__ import annotations

import functools
import hashlib
import json
import multiprocessing
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy
import torch

from megatron_jai.cli import UserError
from megatron_jai.data.datasets import normalize_blend
from megatron_jai.data.preprocess import (MAX_REPORTED_BAD_LINES, _chunks, _remove, index_dtype,
                                          output_paths, read_meta)

KINDS = ("sft", "dpo")
ROLES = ("system", "user", "assistant")
TOO_LONG = ("truncate", "skip", "keep_start")
BAD_RECORD_REASONS = ("not_json", "empty", "missing_field", "bad_message", "unknown_role",
                      "no_assistant", "empty_answer", "chosen_equals_rejected", "template_error",
                      "prompt_too_long")
MASK_SUFFIX = "_mask"
_PLACEHOLDER = "\ue000"  # a private-use character: never in real text, never trimmed


class ChatDataError(UserError):
    """Chat data that cannot be made or read (one-line message, meant for the user)."""


class BadRecord(ValueError):
    """One input record that is skipped and counted under ``reason``."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason)
        self.reason, self.detail = reason, detail


# ---- rendering ---------------------------------------------------------------------------------
class ChatTokenizer:
    """A Hugging Face tokenizer directory with a chat template: renders conversations to token ids
    and assistant-turn loss masks (module docstring)."""

    def __init__(self, path: str):
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        self.path = os.fspath(path)
        if not os.path.isdir(self.path):
            raise ChatDataError(f"tokenizer {self.path!r} is not a directory (a chat template "
                                f"lives in a tokenizer directory's tokenizer_config.json)")
        try:
            self.hf = _load_hf_tokenizer(self.path)
        except Exception as err:  # transformers raises many types for unloadable directories
            raise ChatDataError(f"cannot load the tokenizer in {self.path}: "
                                f"{str(err).splitlines()[0] if str(err) else type(err).__name__}"
                                ) from None
        if not getattr(self.hf, "chat_template", None):
            raise ChatDataError(f"tokenizer {self.path} has no chat template "
                                f"(chat_template in tokenizer_config.json or chat_template.jinja)")
        if not getattr(self.hf, "is_fast", False):
            raise ChatDataError(f"tokenizer {self.path} has no fast (tokenizers) backend: the loss "
                                f"mask needs token offsets")
        self.vocab_size = len(self.hf)
        self.eod = self.hf.eos_token_id
        if self.eod is None:
            raise ChatDataError(f"tokenizer {self.path} has no eos_token")
        self.pad_id = self.hf.pad_token_id if self.hf.pad_token_id is not None else self.eod
        self.template_sha256 = hashlib.sha256(self.hf.chat_template.encode()).hexdigest()
        try:
            self.ignores_system = _PLACEHOLDER not in self.render_text(
                [{"role": "system", "content": _PLACEHOLDER}, {"role": "user", "content": "u"},
                 {"role": "assistant", "content": "a"}])
        except Exception:  # a template that refuses system messages: those records are bad
            self.ignores_system = False

    def render_text(self, messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
        """The template's text, as ``apply_chat_template(..., tokenize=False)`` gives it (also for
        an empty conversation, which Phi-3's template renders as the BOS alone)."""
        from transformers.utils.chat_template_utils import render_jinja_template

        rendered, _ = render_jinja_template(
            conversations=[list(messages)], chat_template=self.hf.chat_template,
            add_generation_prompt=add_generation_prompt, **self.hf.special_tokens_map)
        return rendered[0]

    def render(self, messages: Sequence[dict], train_from: int = 0
               ) -> Tuple[numpy.ndarray, numpy.ndarray]:
        """``(ids int64, mask uint8)`` of a conversation; the mask covers the assistant turns at
        message index ``>= train_from``. Raises :class:`BadRecord` ``template_error`` when the
        template refuses the conversation or renders a turn differently in context."""
        try:
            text = self.render_text(messages)
            spans = []
            for i, message in enumerate(messages):
                if i >= train_from and message["role"] == "assistant":
                    spans.append(self._turn_span(messages, i, text))
        except BadRecord:
            raise
        except Exception as err:  # jinja2's TemplateError / raise_exception in the template
            raise BadRecord("template_error", str(err).splitlines()[0] if str(err) else "") from None
        enc = self.hf(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = numpy.asarray(enc["input_ids"], dtype=numpy.int64)
        offsets = numpy.asarray(enc["offset_mapping"], dtype=numpy.int64).reshape(-1, 2)
        return ids, token_mask(text, offsets, spans)

    def _turn_span(self, messages, i: int, text: str) -> Tuple[int, int]:
        before = self.render_text(messages[:i], add_generation_prompt=True)
        upto = self.render_text(messages[:i + 1])
        if not (upto.startswith(before) and text.startswith(upto)):
            raise BadRecord("template_error", "the chat template does not render a conversation "
                                              "as a prefix of its continuation")
        turn = upto[len(before):]
        # the turn's header (text before its content): where a placeholder content lands
        probe = self.render_text([*messages[:i], {"role": "assistant", "content": _PLACEHOLDER}])
        header = probe.find(_PLACEHOLDER, len(before)) - len(before)
        if header < 0 or probe[len(before):len(before) + header] != turn[:header]:
            header = max(turn.find(messages[i]["content"]), 0)
        return len(before) + header, len(before) + len(turn.rstrip())


def _load_hf_tokenizer(path: str):
    """``AutoTokenizer`` of the tokenizer directory ``path`` as the export writes it
    (:func:`~megatron_jai.data.hf_tokenizer.write_hf_tokenizer`): a sentencepiece directory (Phi-3's
    layout) is converted exactly, not by transformers' own converter."""
    import tempfile

    from transformers import AutoTokenizer

    from megatron_jai.data.hf_tokenizer import write_hf_tokenizer

    if os.path.isfile(os.path.join(path, "tokenizer.json")) or \
            not os.path.isfile(os.path.join(path, "tokenizer.model")):
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    with tempfile.TemporaryDirectory(prefix="jai_tokenizer_") as tmp:
        write_hf_tokenizer(path, tmp)
        return AutoTokenizer.from_pretrained(tmp, local_files_only=True)


@functools.lru_cache(maxsize=4)
def load_chat_tokenizer(path: str) -> ChatTokenizer:
    """:class:`ChatTokenizer` of ``path``, loaded once per process."""
    return ChatTokenizer(path)


def token_mask(text: str, offsets: numpy.ndarray, spans: Sequence[Tuple[int, int]]
               ) -> numpy.ndarray:
    """uint8 mask of the tokens (character ``offsets`` [n, 2] into ``text``) that belong to a
    span: inside it, or overlapping it with a non-whitespace character."""
    mask = numpy.zeros(len(offsets), dtype=numpy.uint8)
    starts, ends = offsets[:, 0], offsets[:, 1]
    for a, b in spans:
        inside = (starts >= a) & (ends <= b) & (starts < b)
        mask[inside] = 1
        for t in numpy.nonzero(~inside & (ends > a) & (starts < b))[0]:
            if text[max(starts[t], a):min(ends[t], b)].strip():
                mask[t] = 1
    return mask


# ---- records -----------------------------------------------------------------------------------
def _messages(value, where: str, allow_empty: bool = False) -> List[dict]:
    if isinstance(value, str):  # a bare prompt string is one user turn
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or (not value and not allow_empty):
        raise BadRecord("bad_message", f"{where} must be a non-empty list of messages")
    out = []
    for m in value:
        if not (isinstance(m, dict) and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), str)):
            raise BadRecord("bad_message", f"{where}: a message needs string role and content")
        if m["role"] not in ROLES:
            raise BadRecord("unknown_role", f"role {m['role']!r}")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _load_record(line: bytes) -> dict:
    if not line.strip():
        raise BadRecord("empty")
    try:
        obj = json.loads(line)
    except ValueError:  # JSONDecodeError and UnicodeDecodeError
        raise BadRecord("not_json") from None
    if not isinstance(obj, dict):
        raise BadRecord("missing_field", "not a JSON object")
    return obj


def parse_sft(obj: dict) -> List[dict]:
    """The conversation of an SFT record, up to its last assistant turn."""
    if "messages" not in obj:
        raise BadRecord("missing_field", "no 'messages'")
    messages = _messages(obj["messages"], "messages")
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
        raise BadRecord("no_assistant")
    return messages[:last + 1]


def parse_dpo(obj: dict) -> Tuple[List[dict], List[dict], List[dict]]:
    """``(prompt, chosen, rejected)`` message lists of a DPO record; the answers are the messages
    that follow the prompt."""
    for key in ("chosen", "rejected"):
        if key not in obj:
            raise BadRecord("missing_field", f"no {key!r}")
    answers = []
    for key in ("chosen", "rejected"):
        value = obj[key]
        if isinstance(value, str):
            answers.append([{"role": "assistant", "content": value}])
        else:
            answers.append(_messages(value, key, allow_empty=True))
    if "prompt" in obj:
        prompt = _messages(obj["prompt"], "prompt")
    elif all(isinstance(obj[k], list) for k in ("chosen", "rejected")):
        n = 0  # implicit prompt: the messages chosen and rejected share
        while n < min(map(len, answers)) and answers[0][n] == answers[1][n]:
            n += 1
        prompt, answers = answers[0][:n], [a[n:] for a in answers]
    else:
        raise BadRecord("missing_field", "no 'prompt'")
    for answer in answers:
        if not any(m["role"] == "assistant" and m["content"].strip() for m in answer):
            raise BadRecord("empty_answer")
    if answers[0] == answers[1]:
        raise BadRecord("chosen_equals_rejected")
    return prompt, answers[0], answers[1]


def _round_starts(messages: Sequence[dict]) -> Tuple[List[int], int]:
    """``(cuts, n_system)``: where the conversation can be cut so that it goes on with a user
    turn after its ``n_system`` leading system messages: every user turn that follows a non-user
    one, oldest first."""
    n_sys = 0
    while n_sys < len(messages) and messages[n_sys]["role"] == "system":
        n_sys += 1
    return [j for j in range(n_sys + 1, len(messages))
            if messages[j]["role"] == "user" and messages[j - 1]["role"] != "user"], n_sys


def fit_record(chat: ChatTokenizer, head: List[dict], tails: Sequence[List[dict]],
               seq_length: int, too_long: str = "truncate", train_head: bool = True):
    """Render ``head + tail`` for each tail (SFT: one empty tail; DPO: chosen and rejected) within
    ``seq_length`` tokens (module docstring). Returns ``(sequences, status)`` with sequences a list
    of ``(ids, mask)`` and status ``"ok"`` / ``"truncated"`` / ``"skipped"`` (sequences None).
    Raises :class:`BadRecord`."""
    def render(cut: int):
        kept = head[:n_sys] + head[cut:] if cut else head
        return [chat.render(kept + tail, 0 if train_head else len(kept)) for tail in tails]

    cuts, n_sys = _round_starts(head)
    seqs = render(0)
    if all(len(ids) <= seq_length for ids, _ in seqs):
        return seqs, "ok"
    # the older rounds that may go (keep_start: none, TRL's truncation keeps the start)
    droppable = {"truncate": cuts, "skip": cuts[-1:], "keep_start": []}[too_long]
    for cut in droppable:
        seqs = render(cut)
        if all(len(ids) <= seq_length for ids, _ in seqs):
            return (None, "skipped") if too_long == "skip" else (seqs, "truncated")
    # still too long: the sequences are cut; is there room for any answer token?
    for ids, mask in seqs:
        trained = numpy.flatnonzero(mask)
        if not trained.size or trained[0] >= seq_length:
            raise BadRecord("prompt_too_long")
    if too_long == "skip":
        return None, "skipped"
    return [(ids[:seq_length], mask[:seq_length]) for ids, mask in seqs], "truncated"


def encode_record(chat: ChatTokenizer, kind: str, obj: dict, seq_length: int,
                  too_long: str = "truncate"):
    """One parsed JSON record -> ``(sequences, status, has_system)`` (see :func:`fit_record`)."""
    if kind == "sft":
        head, tails, train_head = parse_sft(obj), [[]], True
    else:
        prompt, chosen, rejected = parse_dpo(obj)
        head, tails, train_head = prompt, [chosen, rejected], False
    seqs, status = fit_record(chat, head, tails, seq_length, too_long, train_head)
    if kind == "dpo" and seqs and numpy.array_equal(seqs[0][0], seqs[1][0]):
        raise BadRecord("chosen_equals_rejected", "the same tokens")
    has_system = any(m["role"] == "system" for m in head + list(tails[-1]))
    return seqs, status, has_system


# ---- preprocessing -----------------------------------------------------------------------------
@dataclass
class ChatStats:
    output_prefix: str
    kind: str
    seq_length: int
    records: int = 0  # SFT conversations or DPO pairs written
    sequences: int = 0
    tokens: int = 0
    loss_tokens: int = 0  # tokens under the loss mask (assistant turns / answers)
    max_length: int = 0
    truncated: int = 0
    skipped_too_long: int = 0
    system_ignored: int = 0  # records whose system messages the template drops
    lines: int = 0
    bad_lines: Dict[str, int] = field(default_factory=lambda: {r: 0 for r in BAD_RECORD_REASONS})
    bad_line_examples: List[str] = field(default_factory=list)
    seconds: float = 0.0
    vocab_size: int = 0
    eod: int = -1
    pad_id: int = -1
    dtype: str = ""
    fingerprint: str = ""

    @property
    def num_bad_lines(self) -> int:
        return sum(self.bad_lines.values())

    def summary(self) -> str:
        bad = ", ".join(f"{r} {n:,}" for r, n in self.bad_lines.items() if n) or "none"
        unit = "conversations" if self.kind == "sft" else "pairs"
        return (f"preprocess_chat: {self.kind} {self.records:,} {unit} ({self.sequences:,} "
                f"sequences), {self.tokens:,} tokens, {self.loss_tokens:,} trained "
                f"(assistant); truncated {self.truncated:,}, skipped too long "
                f"{self.skipped_too_long:,} (seq_length {self.seq_length}); bad "
                f"{self.num_bad_lines:,} of {self.lines:,} lines ({bad}); {self.seconds:.1f} s -> "
                f"{self.output_prefix}.bin/.idx + {MASK_SUFFIX}.bin/.idx")


def mask_prefix(prefix: str) -> str:
    """The prefix of the loss-mask dataset that goes with the token dataset ``prefix``."""
    return f"{prefix}{MASK_SUFFIX}"


def _data_files(prefix: str) -> List[str]:
    tok_bin, tok_idx, _ = output_paths(prefix)
    mask_bin, mask_idx, _ = output_paths(mask_prefix(prefix))
    return [tok_idx, tok_bin, mask_idx, mask_bin]


def _fingerprint_files(paths: Sequence[str]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def dataset_fingerprint(prefix: str) -> str:
    """sha256 over the contents of a chat dataset's tokens and mask (``.idx`` and ``.bin`` of
    ``PREFIX`` and ``PREFIX_mask``): what a file derived from the dataset (DPO reference log-probs)
    binds to. Recomputed from the files; ``PREFIX.meta.json`` holds the value written."""
    missing = [p for p in _data_files(prefix) if not os.path.isfile(p)]
    if missing:
        raise ChatDataError(f"chat dataset {prefix!r}: missing {', '.join(missing)}")
    return _fingerprint_files(_data_files(prefix))


_worker: dict = {}


def _init_worker(tokenizer_path: str, kind: str, seq_length: int, too_long: str,
                 in_pool: bool = False) -> None:
    if in_pool:  # Ctrl-C: only the parent reports and cleans up
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    _worker.update(chat=load_chat_tokenizer(tokenizer_path), kind=kind, seq_length=seq_length,
                   too_long=too_long)


def _encode_chunk(chunk):
    """Worker: one chunk of lines -> (file index, progress, [(sequences, status, has_system)],
    [(line number, reason, detail)])."""
    file_index, first_line, progress, lines = chunk
    out, bad = [], []
    for offset, line in enumerate(lines):
        try:
            out.append(encode_record(_worker["chat"], _worker["kind"], _load_record(line),
                                     _worker["seq_length"], _worker["too_long"]))
        except BadRecord as err:
            bad.append((first_line + offset, err.reason, err.detail))
    return file_index, progress, out, bad


def preprocess_chat(kind: str, inputs: Sequence[str], output_prefix: str, tokenizer_path: str,
                    seq_length: int = 4096, too_long: str = "truncate", workers: int = 1,
                    max_bad_fraction: float = 0.01, overwrite: bool = False,
                    progress: bool = True, log=None) -> ChatStats:
    """SFT or DPO JSON lines -> ``output_prefix`` (tokens), ``output_prefix_mask`` (loss mask) and
    ``output_prefix.meta.json`` (module docstring).

    Bad records are counted by reason (:data:`BAD_RECORD_REASONS`), the first few reported with
    ``file:line``, and skipped; when more than ``max_bad_fraction`` of the lines are bad nothing is
    written and :class:`ChatDataError` is raised. Everything is written under temporary names and
    renamed at the end: on any error or interrupt no output appears, and an existing dataset is
    only replaced with ``overwrite=True`` (and only once everything succeeded).
    """
    from megatron_jai.cli import progress as progress_bar

    if log is None:
        def log(msg):
            print(msg, file=sys.stderr)

    if kind not in KINDS:
        raise ChatDataError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if too_long not in TOO_LONG:
        raise ChatDataError(f"too_long must be one of {', '.join(TOO_LONG)}, got {too_long!r}")
    if seq_length < 2:
        raise ChatDataError(f"seq_length must be >= 2, got {seq_length}")
    if workers < 1:
        raise ChatDataError(f"workers must be >= 1, got {workers}")
    if not 0 <= max_bad_fraction <= 1:
        raise ChatDataError(f"max_bad_fraction must be in [0, 1], got {max_bad_fraction}")
    inputs = [os.fspath(p) for p in inputs]
    if not inputs:
        raise ChatDataError("no input files given")
    for path in inputs:
        if not os.path.isfile(path):
            raise ChatDataError(f"input file {path!r} does not exist")
    meta_path = output_paths(output_prefix)[2]
    finals = _data_files(output_prefix) + [meta_path]
    if not overwrite and any(os.path.exists(p) for p in finals):
        raise ChatDataError(f"output {output_prefix} exists (use --force to replace it)")
    chat = load_chat_tokenizer(tokenizer_path)  # in the parent too: fail early, learn the vocab
    dtype = numpy.dtype(index_dtype(chat.vocab_size))

    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    os.makedirs(os.path.dirname(os.path.abspath(output_prefix)), exist_ok=True)
    tag = f".tmp{os.getpid()}"
    temps = [p + tag for p in finals]  # tok.idx, tok.bin, mask.idx, mask.bin, meta
    stats = ChatStats(output_prefix=output_prefix, kind=kind, seq_length=seq_length,
                      vocab_size=chat.vocab_size, eod=chat.eod, pad_id=chat.pad_id,
                      dtype=dtype.name)
    total_bytes = sum(os.path.getsize(p) for p in inputs)
    init_args = (tokenizer_path, kind, seq_length, too_long)
    start = time.time()
    pool = None
    try:
        tokens_out = IndexedDatasetBuilder(temps[1], dtype=dtype.type)
        mask_out = IndexedDatasetBuilder(temps[3], dtype=numpy.uint8)
        if workers > 1:
            pool = multiprocessing.get_context("spawn").Pool(
                workers, initializer=_init_worker, initargs=(*init_args, True))
            results = pool.imap(_encode_chunk, _chunks(inputs, stats), chunksize=1)
        else:
            _init_worker(*init_args)
            results = map(_encode_chunk, _chunks(inputs, stats))
        with progress_bar(total=total_bytes, unit="B", unit_scale=True, enabled=progress,
                          desc=f"preprocess_chat {kind}") as bar:
            for file_index, position, records, bad in results:
                for seqs, status, has_system in records:
                    stats.system_ignored += int(has_system and chat.ignores_system)
                    if status == "skipped":
                        stats.skipped_too_long += 1
                        continue
                    stats.truncated += int(status == "truncated")
                    lengths = [len(ids) for ids, _ in seqs]
                    tokens_out.add_document(numpy.concatenate([ids for ids, _ in seqs]), lengths)
                    mask_out.add_document(numpy.concatenate([m for _, m in seqs]), lengths)
                    stats.records += 1
                    stats.sequences += len(seqs)
                    stats.tokens += sum(lengths)
                    stats.loss_tokens += int(sum(int(m.sum()) for _, m in seqs))
                    stats.max_length = max(stats.max_length, *lengths)
                for line_no, reason, detail in bad:
                    stats.bad_lines[reason] += 1
                    if len(stats.bad_line_examples) < MAX_REPORTED_BAD_LINES:
                        example = f"{inputs[file_index]}:{line_no}: {reason}"
                        stats.bad_line_examples.append(example + (f" ({detail})" if detail else ""))
                        log(f"warning: skipped bad record {stats.bad_line_examples[-1]}")
                bar.update(position - bar.n)
        if pool is not None:
            pool.close()
            pool.join()
            pool = None
        _check_bad_fraction(stats, max_bad_fraction, inputs)
        if stats.records == 0:
            raise ChatDataError(f"no usable records in {', '.join(inputs)} ({stats.lines} lines, "
                                f"{stats.skipped_too_long} too long)")
        tokens_out.finalize(temps[0])
        mask_out.finalize(temps[2])
        stats.fingerprint = _fingerprint_files(temps[:4])
        stats.seconds = time.time() - start
        meta = {"kind": kind, "tokenizer": os.path.abspath(tokenizer_path),
                "tokenizer_kind": "huggingface", "chat_template_sha256": chat.template_sha256,
                "inputs": [os.path.abspath(p) for p in inputs], "too_long": too_long,
                "max_bad_fraction": max_bad_fraction, "mask_prefix_suffix": MASK_SUFFIX,
                **asdict(stats)}
        meta.pop("output_prefix")
        with open(temps[4], "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2)
            f.write("\n")
        # the tokens' .idx last: a reader opens a dataset through it, so a dataset is never half-new
        for order in (4, 3, 2, 1, 0):
            os.replace(temps[order], finals[order])
        if stats.num_bad_lines > len(stats.bad_line_examples):
            log(f"warning: {stats.num_bad_lines - len(stats.bad_line_examples)} more bad records "
                f"not listed")
        if stats.system_ignored:
            log(f"warning: the chat template of {tokenizer_path} ignores system messages; "
                f"{stats.system_ignored:,} records had one")
        return stats
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
        _remove(temps)


def _check_bad_fraction(stats: ChatStats, max_bad_fraction: float, inputs) -> None:
    """More bad lines than ``max_bad_fraction`` of all lines: a wrong file or format, not noise."""
    if stats.num_bad_lines > max_bad_fraction * stats.lines:
        reasons = ", ".join(f"{r} {n}" for r, n in stats.bad_lines.items() if n)
        first = f"; first: {stats.bad_line_examples[0]}" if stats.bad_line_examples else ""
        hint = (f" (prompt_too_long: raise --seq-length above {stats.seq_length}, or "
                f"--max-bad-fraction to leave them out)" if stats.bad_lines["prompt_too_long"] else "")
        raise ChatDataError(
            f"{stats.num_bad_lines} of {stats.lines} lines of {', '.join(inputs)} are bad "
            f"({reasons}), more than --max-bad-fraction {max_bad_fraction:g}{hint}{first}; "
            f"nothing written")


# ---- readers for training ----------------------------------------------------------------------
def read_chat_meta(prefix: str, kind: Optional[str] = None) -> dict:
    """The ``.meta.json`` of a chat dataset, checked: it exists, its files exist, its kind is
    ``kind`` (when given)."""
    meta = read_meta(prefix)
    if meta is None or meta.get("kind") not in KINDS:
        raise ChatDataError(f"{prefix!r} is not a chat dataset (no chat {output_paths(prefix)[2]};"
                            f" make it with tools/preprocess_chat.py)")
    if kind is not None and meta["kind"] != kind:
        raise ChatDataError(f"{prefix!r} is a {meta['kind']} dataset, not {kind}")
    missing = [p for p in _data_files(prefix) if not os.path.isfile(p)]
    if missing:
        raise ChatDataError(f"chat dataset {prefix!r}: missing {', '.join(missing)}")
    return meta


class _ChatSource:
    """One chat dataset: record ``r`` -> its sequences as ``[(ids, mask)]`` (1 for SFT, 2 for
    DPO)."""

    def __init__(self, prefix: str, kind: str, seq_length: int):
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        self.prefix, self.meta = prefix, read_chat_meta(prefix, kind)
        self.per_record = 1 if kind == "sft" else 2
        self.tokens = IndexedDataset(prefix)
        self.mask = IndexedDataset(mask_prefix(prefix))
        lengths = self.tokens.sequence_lengths
        docs = self.tokens.document_indices
        if not (numpy.array_equal(lengths, self.mask.sequence_lengths)
                and numpy.array_equal(docs, self.mask.document_indices)):
            raise ChatDataError(f"{prefix}: the mask dataset does not match the tokens")
        if not numpy.array_equal(docs, numpy.arange(0, len(lengths) + 1, self.per_record)):
            raise ChatDataError(f"{prefix}: not a {kind} layout ({self.per_record} sequence(s) "
                                f"per record)")
        if lengths.size and int(lengths.max()) > seq_length:
            raise ChatDataError(f"{prefix} holds sequences of up to {int(lengths.max())} tokens, "
                                f"longer than seq_length {seq_length}; preprocess it with "
                                f"--seq-length {seq_length}")
        self.lengths = lengths.reshape(-1, self.per_record).max(axis=1)  # per record
        self.size = len(self.lengths)

    def __getitem__(self, r: int):
        first = r * self.per_record
        return [(numpy.asarray(self.tokens[i], dtype=numpy.int64),
                 numpy.asarray(self.mask[i], dtype=numpy.float32))
                for i in range(first, first + self.per_record)]


def pack_greedy(lengths: Sequence[int], seq_length: int, max_packs: Optional[int] = None
                ) -> List[int]:
    """Next-fit packing, in order: the boundaries ``[0, b1, b2, ...]`` of consecutive groups of
    ``lengths`` whose sums stay within ``seq_length`` (each length must fit alone). Stops after
    ``max_packs`` complete groups (else it covers all lengths)."""
    bounds, used = [0], 0
    for i, n in enumerate(lengths):
        if n > seq_length:
            raise ChatDataError(f"a sequence of {n} tokens does not fit seq_length {seq_length}")
        if used + n > seq_length:
            bounds.append(i)
            used = 0
            if max_packs is not None and len(bounds) > max_packs:
                return bounds
        used += n
    if used:
        bounds.append(len(lengths))
    return bounds


class ChatDataset(torch.utils.data.Dataset):
    """SFT / DPO samples from a blend of chat datasets (see :func:`build_chat_dataset`)."""

    def __init__(self, kind: str, blend, seq_length: int, num_samples: Optional[int] = None,
                 seed: int = 1234, pad_id: Optional[int] = None, pack: bool = False):
        if kind not in KINDS:
            raise ChatDataError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
        if pack and kind != "sft":
            raise ChatDataError("packing is for SFT only (a DPO pair is one chosen and one "
                                "rejected sequence)")
        if seq_length < 2 or (num_samples is not None and num_samples < 1):
            raise ChatDataError(f"seq_length must be >= 2 and num_samples >= 1 "
                                f"(got {seq_length}, {num_samples})")
        prefixes, weights = normalize_blend(blend)
        self.kind, self.seq_length, self.seed, self.pack = kind, seq_length, seed, pack
        self.prefixes = prefixes
        self.sources = [_ChatSource(p, kind, seq_length) for p in prefixes]
        for key in ("vocab_size", "eod"):
            values = {s.meta.get(key) for s in self.sources}
            if len(values) > 1:
                raise ChatDataError(f"the blend mixes datasets of different tokenizers "
                                    f"({key} {sorted(values)}): {prefixes}")
        if pad_id is None:
            pad_id = self.sources[0].meta.get("pad_id", self.sources[0].meta.get("eod"))
        self.pad_id = int(pad_id)
        self._orders: Dict[Tuple[int, int], numpy.ndarray] = {}
        if weights is None and len(prefixes) > 1:  # unweighted list: in proportion to size
            weights = [s.size / sum(t.size for t in self.sources) for s in self.sources]
        if num_samples is None:  # one pass, in order, each record (or pack) once
            self.units = [self._units_in_order(d) for d in range(len(self.sources))]
            counts = [len(u) - 1 if pack else u for u in self.units]
            self.dataset_index = numpy.repeat(numpy.arange(len(counts)), counts)
            self.dataset_sample_index = numpy.concatenate([numpy.arange(c) for c in counts])
            self.shuffle = False
        else:
            self.dataset_index, self.dataset_sample_index = _blend_indices(
                weights or [1.0], num_samples)
            self.shuffle = True
            counts = numpy.bincount(self.dataset_index, minlength=len(self.sources))
            self.units = [self._packs_shuffled(d, int(c)) if pack else None
                          for d, c in enumerate(counts)]

    # -- which records make unit k of dataset d
    def _units_in_order(self, d: int):
        if not self.pack:
            return self.sources[d].size
        return pack_greedy(self.sources[d].lengths, self.seq_length)

    def _packs_shuffled(self, d: int, n_packs: int) -> numpy.ndarray:
        """Boundaries in dataset ``d``'s shuffled record stream of its first ``n_packs`` packs."""
        if n_packs == 0:
            return numpy.zeros(1, dtype=numpy.int64)
        lengths = self.sources[d].lengths

        def stream():
            for epoch in range(sys.maxsize):
                yield from lengths[self._epoch_order(d, epoch)]

        return numpy.asarray(pack_greedy(stream(), self.seq_length, max_packs=n_packs),
                             dtype=numpy.int64)

    def _epoch_order(self, d: int, epoch: int) -> numpy.ndarray:
        """Records of dataset ``d`` in epoch ``epoch``'s order: seeded by (seed, d, epoch)."""
        key = (d, epoch)
        if key not in self._orders:
            if len(self._orders) >= 2 * len(self.sources):
                self._orders.pop(next(iter(self._orders)))
            rng = numpy.random.default_rng([self.seed, d, epoch])
            self._orders[key] = rng.permutation(self.sources[d].size)
        return self._orders[key]

    def _stream_record(self, d: int, position: int) -> int:
        size = self.sources[d].size
        if not self.shuffle:
            return position
        return int(self._epoch_order(d, position // size)[position % size])

    def records(self, i: int) -> Tuple[int, List[int]]:
        """``(dataset_id, record indices)`` of sample ``i``: one record, or a pack's."""
        d, k = int(self.dataset_index[i]), int(self.dataset_sample_index[i])
        if not self.pack:
            return d, [self._stream_record(d, k)]
        bounds = self.units[d]
        return d, [self._stream_record(d, p) for p in range(int(bounds[k]), int(bounds[k + 1]))]

    def __len__(self) -> int:
        return len(self.dataset_index)

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} out of range ({len(self)})")
        d, records = self.records(i)
        source, S = self.sources[d], self.seq_length
        if self.kind == "dpo":
            rows = [_sequence_arrays([seq], S, self.pad_id) for seq in source[records[0]]]
            item = {key: torch.from_numpy(numpy.stack([r[key] for r in rows]))
                    for key in rows[0] if key != "cu_seqlens"}
            item["record_index"] = records[0]
        else:
            arrays = _sequence_arrays([source[r][0] for r in records], S, self.pad_id)
            item = {key: torch.from_numpy(value) for key, value in arrays.items()}
            if self.pack:
                item["max_seqlen"] = int(numpy.diff(arrays["cu_seqlens"]).max())
            else:
                del item["cu_seqlens"]
        item["dataset_id"] = d
        return item


def _sequence_arrays(seqs, seq_length: int, pad_id: int) -> Dict[str, numpy.ndarray]:
    """Sequences ``[(ids, mask)]`` laid one after the other into ``seq_length`` positions,
    right-padded: ``labels[t] = tokens[t + 1]`` within a sequence, ``loss_mask[t] = mask[t + 1]``
    (the label is an assistant token), nothing across sequence ends; positions restart at 0 per
    sequence (padding keeps its index); ``cu_seqlens`` their boundaries (the padding, if any, is a
    last segment)."""
    tokens = numpy.full(seq_length, pad_id, dtype=numpy.int64)
    labels = numpy.full(seq_length, pad_id, dtype=numpy.int64)
    loss_mask = numpy.zeros(seq_length, dtype=numpy.float32)
    position_ids = numpy.arange(seq_length, dtype=numpy.int64)
    bounds, offset = [0], 0
    for ids, mask in seqs:
        n = len(ids)
        tokens[offset:offset + n] = ids
        labels[offset:offset + n - 1] = ids[1:]
        loss_mask[offset:offset + n - 1] = mask[1:]
        position_ids[offset:offset + n] = numpy.arange(n)
        offset += n
        bounds.append(offset)
    if offset < seq_length:
        bounds.append(seq_length)
    return {"tokens": tokens, "labels": labels, "loss_mask": loss_mask,
            "position_ids": position_ids, "cu_seqlens": numpy.asarray(bounds, dtype=numpy.int32)}


def _blend_indices(weights: Sequence[float], size: int) -> Tuple[numpy.ndarray, numpy.ndarray]:
    """Megatron-Core's deterministic blend: sample ``i`` comes from the dataset furthest below its
    weighted share so far (``BlendedDataset``'s own C++ helper)."""
    if len(weights) == 1:
        return numpy.zeros(size, dtype=numpy.int64), numpy.arange(size, dtype=numpy.int64)
    from megatron.core.datasets import helpers

    dataset_index = numpy.zeros(size, dtype=numpy.int16)
    dataset_sample_index = numpy.zeros(size, dtype=numpy.int64)
    helpers.build_blending_indices(dataset_index, dataset_sample_index,
                                   numpy.asarray(weights, dtype=numpy.float64), len(weights), size,
                                   False)
    return dataset_index.astype(numpy.int64), dataset_sample_index


def build_chat_dataset(kind: str, blend, seq_length: int, num_samples: Optional[int] = None,
                       seed: int = 1234, pad_id: Optional[int] = None, pack: bool = False):
    """A map-style dataset of SFT or DPO samples from chat datasets made by
    :func:`preprocess_chat`.

    Args:
        kind: ``"sft"`` or ``"dpo"`` (must match the datasets' ``.meta.json``).
        blend: one prefix or ``[(weight, prefix), ...]`` (any form of
            :func:`megatron_jai.data.datasets.normalize_blend`); ``dataset_id`` indexes it.
        seq_length: S; every stored sequence must fit (preprocess with ``--seq-length`` <= S).
        num_samples: training samples: the blend is drawn as Megatron-Core's ``BlendedDataset``
            does, each dataset's records in a new seeded order every epoch, so sample ``i``
            depends only on (blend, seed, i) (exact resume by sample index). ``None``: validation,
            every record once, in order, dataset after dataset.
        seed: shuffling seed.
        pad_id: padding id (default: the tokenizer's pad, else its EOD, from the ``.meta.json``).
        pack: SFT only: fill each sample with consecutive conversations (next-fit) and return
            ``cu_seqlens`` (int32) and ``max_seqlen``; only for attention that keeps the
            conversations apart (Transformer Engine's packed sequences).

    Items: ``tokens``, ``labels`` (tokens shifted left by one; padding = ``pad_id``),
    ``loss_mask`` (float, 1 where the label is an assistant-turn token, its closing token
    included), ``position_ids``: each [S], or [2, S] for DPO (row 0 prompt+chosen, row 1
    prompt+rejected; the mask covers the answer); ``dataset_id``; DPO also ``record_index`` (the
    pair's index in its dataset).
    """
    return ChatDataset(kind, blend, seq_length, num_samples, seed, pad_id, pack)
