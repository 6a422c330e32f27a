"""Scoring text with a language model: the windows, the batching, the totals.

A document is the token sequence ``x = [EOD] + encode(text)``: the end-of-document token stands
before it as it does in our packed training data, and every token of the text is predicted (the
EOD after the text is not: the characters do not count it). With ``N = len(x)`` positions and a
context of ``L`` tokens, a document that fits is one window ``x[0:N]``. A longer one is cut into
windows of at most ``L`` tokens whose ends advance by ``stride`` (default ``L - 1``: windows share
one token, so every target is predicted once, with at least one token of context; a smaller
stride gives later windows more context at more compute): window ``k`` covers
``x[max(0, e_k - L) : e_k]`` with ``e_k = min(e_{k-1} + stride, N)`` and scores the targets
``e_{k-1} .. e_k - 1`` that no earlier window scored. Both model kinds (Megatron, Hugging Face)
go through this one function, so their scores differ only by numerics.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, List, Optional

import torch

from megatron_jai.cli import UserError
from megatron_jai.evaluation.metrics import BitsTally


@dataclass(frozen=True)
class Window:
    begin: int  # first input position
    end: int  # one past the last position
    first_scored: int  # first target position this window scores


def windows(num_positions: int, context: int, stride: Optional[int] = None) -> List[Window]:
    """The scoring windows of a sequence of ``num_positions`` tokens (see the module docstring)."""
    stride = context - 1 if stride is None else stride
    if context < 2:
        raise UserError(f"the scoring context must be >= 2 tokens, got {context}")
    if not 1 <= stride <= context - 1:
        raise UserError(f"--stride must be between 1 and the context - 1 ({context - 1}), got {stride}")
    out: List[Window] = []
    end = min(context, num_positions)
    if num_positions >= 2:
        out.append(Window(0, end, 1))
    while end < num_positions:
        new_end = min(end + stride, num_positions)
        out.append(Window(max(0, new_end - context), new_end, end))
        end = new_end
    return out


def score_documents(lm, texts: Iterable[str], context: int, stride: Optional[int] = None,
                    batch_size: int = 4, progress=None, vocab: Optional[int] = None) -> BitsTally:
    """Bits of every text under ``lm`` (a :class:`~megatron_jai.inference.lm.LanguageModel`);
    ``progress`` (a tqdm bar or None) advances by one per document. ``vocab``: probabilities over
    the first ``vocab`` ids only (every token of the texts must be one of them)."""
    if vocab is not None and not 2 <= vocab <= lm.vocab_size:
        raise UserError(f"--score-vocab must be between 2 and the model's {lm.vocab_size} ids, "
                        f"got {vocab}")
    tally = BitsTally()
    pending: List[tuple] = []  # (token sequence, window)

    def flush():
        if not pending:
            return
        width = max(w.end - w.begin for _, w in pending)
        batch = torch.full((len(pending), width), int(lm.tokenizer.eod), dtype=torch.long)
        for row, (seq, w) in enumerate(pending):
            batch[row, : w.end - w.begin] = torch.tensor(seq[w.begin: w.end])
        # [b, width - 1]; entry j predicts position begin + j + 1
        log_probs = lm.log_probs(batch, vocab)
        for row, (_, w) in enumerate(pending):
            tally.add_log_probs(log_probs[row, w.first_scored - w.begin - 1: w.end - w.begin - 1])
        pending.clear()

    for text in texts:
        seq = [int(lm.tokenizer.eod)] + lm.tokenizer.encode(text)
        if vocab is not None and max(seq) >= vocab:
            raise UserError(f"a text encodes to id {max(seq)}, outside --score-vocab {vocab} (score "
                            f"with the first N ids only text that those ids encode)")
        tally.add_document(text)
        for w in windows(len(seq), context, stride):
            pending.append((seq, w))
            if len(pending) == batch_size:
                flush()
        if progress is not None:
            progress.update(1)
    flush()
    return tally


def read_texts(path: str, text_key: str = "text", limit: Optional[int] = None) -> List[str]:
    """Documents of a JSON-lines file (``text_key``, plain or gzip), or the non-empty lines of a
    plain text file (NTREX: one sentence a line); the first ``limit`` when given."""
    from megatron_jai.data.files import iter_documents

    try:
        texts: List[str] = []
        for text in iter_documents(path, text_key):
            if text.strip():
                texts.append(text)
                if limit is not None and len(texts) >= limit:
                    break
    except ValueError as err:
        raise UserError(str(err)) from None
    if not texts:
        raise UserError(f"{path} holds no text")
    return texts
