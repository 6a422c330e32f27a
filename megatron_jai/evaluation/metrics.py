"""Metrics: bits per character / byte and perplexity, chrF (sacrebleu), and exact match / token F1
with a Thai-aware normaliser.

Bits per character and per byte are tokenizer-independent: the total information the model needs,
``sum(-log2 p(token))`` over every token of a text, divided by the text's characters (or UTF-8
bytes). A 32K and a 64K model therefore compare on the same text; token perplexity does not.
"""
from __future__ import annotations

import math
import re
import string
import unicodedata
from collections import Counter
from dataclasses import dataclass
from typing import List, Sequence


@dataclass
class BitsTally:
    """Running totals over the documents of one text input."""

    bits: float = 0.0
    tokens: int = 0
    characters: int = 0
    bytes: int = 0
    documents: int = 0

    def add_document(self, text: str) -> None:
        self.documents += 1
        self.characters += len(text)
        self.bytes += len(text.encode("utf-8"))

    def add_log_probs(self, log_probs) -> None:
        """Natural-log probabilities of scored tokens."""
        self.bits -= float(log_probs.double().sum()) / math.log(2)
        self.tokens += int(log_probs.numel())

    def metrics(self) -> dict:
        per_token = self.bits / self.tokens if self.tokens else float("nan")
        return {
            "bits_per_char": self.bits / self.characters if self.characters else float("nan"),
            "bits_per_byte": self.bits / self.bytes if self.bytes else float("nan"),
            "bits_per_token": per_token,
            "perplexity": 2.0 ** per_token if self.tokens else float("nan"),
            "bits": self.bits, "tokens": self.tokens, "characters": self.characters,
            "bytes": self.bytes, "documents": self.documents,
        }


def chrf(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Corpus chrF (sacrebleu's defaults: character 6-grams, beta 2, no word n-grams)."""
    from sacrebleu.metrics import CHRF

    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    return float(CHRF().corpus_score(list(hypotheses), [list(references)]).score)


# ---- question answering ------------------------------------------------------------------------
_THAI_DIGITS = str.maketrans("๐๑๒๓๔๕๖๗๘๙", "0123456789")
_ENGLISH_ARTICLES = re.compile(r"\b(a|an|the)\b")
# Thai marks written above/below a base letter (sara am's nikhahit, vowels, tone marks, ...): they
# belong to the letter before them, so they never start a token of their own.
_THAI_COMBINING = set(chr(c) for c in [0x0E31, *range(0x0E34, 0x0E3B), *range(0x0E47, 0x0E4F)])


def _is_thai(ch: str) -> bool:
    return "\u0e00" <= ch <= "\u0e7f"


def normalize_answer(text: str) -> str:
    """NFKC (which also spells sara am ``ำ`` as nikhahit + sara aa, the way it is often typed), Thai
    digits -> Arabic digits, lower case, punctuation removed (``ฯ`` and ``ๆ`` are
    Thai letters-like signs and stay), English articles removed, whitespace collapsed."""
    text = unicodedata.normalize("NFKC", text).translate(_THAI_DIGITS).lower()
    text = "".join(" " if (unicodedata.category(ch).startswith("P") or ch in string.punctuation)
                   and ch not in "ฯๆ" else ch for ch in text)
    text = _ENGLISH_ARTICLES.sub(" ", text)
    return " ".join(text.split())


def answer_tokens(text: str) -> List[str]:
    """Tokens for F1 after :func:`normalize_answer`. Thai has no spaces between words, so a Thai run
    is split into letters with their combining marks (character clusters); other text is split at
    whitespace."""
    tokens: List[str] = []
    for word in normalize_answer(text).split():
        latin = ""
        for ch in word:
            if _is_thai(ch):
                if latin:
                    tokens.append(latin)
                    latin = ""
                if ch in _THAI_COMBINING and tokens and _is_thai(tokens[-1][-1]):
                    tokens[-1] += ch
                else:
                    tokens.append(ch)
            else:
                latin += ch
        if latin:
            tokens.append(latin)
    return tokens


def exact_match(prediction: str, references: Sequence[str]) -> float:
    """1.0 when the normalised prediction equals a normalised reference (spaces ignored: Thai
    spacing is a matter of style)."""
    pred = normalize_answer(prediction).replace(" ", "")
    return float(any(pred == normalize_answer(r).replace(" ", "") for r in references))


def token_f1(prediction: str, references: Sequence[str]) -> float:
    """SQuAD's token F1 over :func:`answer_tokens`, the best over the references."""
    pred = answer_tokens(prediction)
    best = 0.0
    for ref in references:
        gold = answer_tokens(ref)
        if not pred or not gold:
            best = max(best, float(pred == gold))
            continue
        common = sum((Counter(pred) & Counter(gold)).values())
        if common:
            precision, recall = common / len(pred), common / len(gold)
            best = max(best, 2 * precision * recall / (precision + recall))
    return best
