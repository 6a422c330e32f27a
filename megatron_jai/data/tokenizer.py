"""One way to load the project's tokenizers: sentencepiece models and Hugging Face directories.

``load_tokenizer(path)`` accepts

* a sentencepiece ``.model`` file (end of document = ``</s>``, or ``<|endoftext|>`` when the model
  has that piece, as Phi-3's extended vocabularies do);
* a directory holding ``tokenizer.json`` (a Hugging Face fast tokenizer; end of document = the
  ``eos_token`` of ``tokenizer_config.json`` / ``special_tokens_map.json``);
* a directory holding ``tokenizer.model`` (and optionally ``added_tokens.json``, the Phi-3 layout:
  32,000 sentencepiece pieces + ``<|endoftext|>`` = 32000 ... ``<|user|>`` = 32010; end of document =
  ``<|endoftext|>`` when present, else the config's ``eos_token``, else ``</s>``);
* any other directory ``transformers.AutoTokenizer`` loads with ``local_files_only=True``.

Every tokenizer has ``vocab_size`` (number of ids, specials included), ``eod``, ``encode(text)``
(no BOS), ``encode_batch(texts)``, ``decode(ids)`` and ``special_tokens`` (name -> id). A literal
special-token string in the text (``"<|user|>"``) stays text with the Phi-3 directory layout (ids
stacked above sentencepiece) but becomes its id where the specials are pieces of the model or added
tokens of ``tokenizer.json`` (the extended 64K tokenizer, in both its forms).
"""
from __future__ import annotations

import json
import os
from typing import Dict, List, Optional, Sequence

from megatron_jai.cli import UserError


class TokenizerError(UserError):
    """A tokenizer path that cannot be loaded (one-line message, meant for the user)."""


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as err:
        raise TokenizerError(f"cannot read {path}: {err}") from None


def _token_content(value) -> Optional[str]:
    """``eos_token`` is either a string or an AddedToken dict ``{"content": ...}``."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _configured_eos(directory: str) -> Optional[str]:
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            eos = _token_content(_read_json(path).get("eos_token"))
            if eos:
                return eos
    return None


class Tokenizer:
    """Common interface (see the module docstring). Subclasses fill the attributes below."""

    path: str
    kind: str
    vocab_size: int
    eod: int
    special_tokens: Dict[str, int]

    def encode(self, text: str) -> List[int]:
        raise NotImplementedError

    def encode_batch(self, texts: Sequence[str]) -> List[List[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(path={self.path!r}, vocab_size={self.vocab_size}, "
                f"eod={self.eod})")


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece model, optionally with extra special tokens stacked above its pieces."""

    kind = "sentencepiece"

    def __init__(self, model_path: str, added_tokens: Optional[Dict[str, int]] = None,
                 eod_token: Optional[str] = None):
        import sentencepiece as spm

        self.path = model_path
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(model_path)
        except (OSError, RuntimeError) as err:
            raise TokenizerError(f"{model_path} is not a sentencepiece model: "
                                 f"{str(err).splitlines()[0]}") from None
        n_pieces = self.sp.GetPieceSize()
        self.added_tokens = dict(sorted((added_tokens or {}).items(), key=lambda kv: kv[1]))
        self._added_by_id = {i: t for t, i in self.added_tokens.items()}
        for tok, idx in self.added_tokens.items():
            if idx < n_pieces:
                # An added token overriding an existing piece id would make ids ambiguous.
                if self.sp.IdToPiece(idx) != tok:
                    raise TokenizerError(f"added token {tok!r} reuses sentencepiece id {idx} "
                                         f"({self.sp.IdToPiece(idx)!r})")
        self.vocab_size = max([n_pieces - 1, *self.added_tokens.values()]) + 1
        self.special_tokens = {}
        for name, idx in (("<unk>", self.sp.unk_id()), ("<s>", self.sp.bos_id()),
                          ("</s>", self.sp.eos_id()), ("<pad>", self.sp.pad_id())):
            if idx >= 0:
                self.special_tokens[self.sp.IdToPiece(idx)] = idx
        self.special_tokens.update(self.added_tokens)
        if eod_token is None and ("<|endoftext|>" in self.added_tokens or
                                  self.sp.PieceToId("<|endoftext|>") != self.sp.unk_id()):
            # Phi-3 family (also its extended vocabularies, where the specials are pieces):
            # documents end with <|endoftext|>, whichever form the tokenizer is loaded from.
            eod_token = "<|endoftext|>"
        if eod_token is None:
            if self.sp.eos_id() < 0:
                raise TokenizerError(f"{model_path} has no end-of-sequence piece to use as EOD")
            self.eod = self.sp.eos_id()
        elif eod_token in self.special_tokens:
            self.eod = self.special_tokens[eod_token]
        else:
            idx = self.sp.PieceToId(eod_token)
            if idx == self.sp.unk_id() and eod_token != self.sp.IdToPiece(idx):
                raise TokenizerError(f"end-of-document token {eod_token!r} is not in {model_path}")
            self.eod = idx
        self.bos = self.sp.bos_id() if self.sp.bos_id() >= 0 else None
        self._n_pieces = n_pieces

    def encode(self, text: str) -> List[int]:
        return self.sp.EncodeAsIds(text)

    def encode_batch(self, texts: Sequence[str]) -> List[List[int]]:
        return self.sp.Encode(list(texts), out_type=int)

    def decode(self, ids: Sequence[int]) -> str:
        ids = [int(i) for i in ids]
        if not self._added_by_id:
            return self.sp.DecodeIds(ids)
        out, run = [], []
        for i in ids:
            if i in self._added_by_id:
                if run:
                    out.append(self.sp.DecodeIds(run))
                    run = []
                out.append(self._added_by_id[i])
            else:
                run.append(i)
        if run:
            out.append(self.sp.DecodeIds(run))
        return "".join(out)


class HuggingFaceTokenizer(Tokenizer):
    """A Hugging Face tokenizer: ``tokenizer.json`` through the ``tokenizers`` library when present
    (fast, fork-safe), otherwise ``transformers.AutoTokenizer`` with local files only."""

    kind = "huggingface"

    def __init__(self, directory: str):
        self.path = directory
        tok_json = os.path.join(directory, "tokenizer.json")
        eos = _configured_eos(directory)
        if os.path.isfile(tok_json):
            from tokenizers import Tokenizer as FastTokenizer

            try:
                self._fast = FastTokenizer.from_file(tok_json)
            except Exception as err:  # the tokenizers library raises plain Exceptions
                raise TokenizerError(f"cannot load {tok_json}: {str(err).splitlines()[0]}") from None
            self._auto = None
            self.vocab_size = self._fast.get_vocab_size(with_added_tokens=True)
            self.special_tokens = {t.content: i for i, t in
                                   self._fast.get_added_tokens_decoder().items() if t.special}
            eod = self._fast.token_to_id(eos) if eos else None
            if eod is None:
                for cand in ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>"):
                    if self._fast.token_to_id(cand) is not None:
                        eod = self._fast.token_to_id(cand)
                        break
            bos = self._fast.token_to_id("<s>")
        else:
            from transformers import AutoTokenizer

            try:
                self._auto = AutoTokenizer.from_pretrained(directory, local_files_only=True)
            except Exception as err:  # transformers raises many types for unloadable dirs
                raise TokenizerError(f"{directory} holds no loadable tokenizer "
                                     f"(tokenizer.json, tokenizer.model or a transformers "
                                     f"tokenizer): {str(err).splitlines()[0]}") from None
            self._fast = None
            self.vocab_size = len(self._auto)
            self.special_tokens = {t: self._auto.convert_tokens_to_ids(t)
                                   for t in self._auto.all_special_tokens}
            eod = self._auto.eos_token_id
            if eod is None and eos:
                eod = self._auto.convert_tokens_to_ids(eos)
            bos = self._auto.bos_token_id
        if eod is None:
            raise TokenizerError(f"{directory}: no end-of-document token (set eos_token in "
                                 f"tokenizer_config.json)")
        self.eod = int(eod)
        self.bos = bos

    def encode(self, text: str) -> List[int]:
        if self._fast is not None:
            return self._fast.encode(text, add_special_tokens=False).ids
        return self._auto.encode(text, add_special_tokens=False, split_special_tokens=True)

    def encode_batch(self, texts: Sequence[str]) -> List[List[int]]:
        if self._fast is not None:
            return [e.ids for e in self._fast.encode_batch(list(texts), add_special_tokens=False)]
        return [self.encode(t) for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        ids = [int(i) for i in ids]
        if self._fast is not None:
            return self._fast.decode(ids, skip_special_tokens=False)
        return self._auto.decode(ids, skip_special_tokens=False)


def load_tokenizer(path: str) -> Tokenizer:
    """Load a tokenizer from a sentencepiece ``.model`` file or a tokenizer directory (see the
    module docstring for the accepted layouts and the end-of-document rule). Raises
    :class:`TokenizerError` with a one-line message when nothing loadable is there."""
    path = os.fspath(path)
    if os.path.isfile(path):
        return SentencePieceTokenizer(path)
    if not os.path.isdir(path):
        raise TokenizerError(f"tokenizer {path!r} does not exist")
    if os.path.isfile(os.path.join(path, "tokenizer.json")):
        return HuggingFaceTokenizer(path)
    sp_model = os.path.join(path, "tokenizer.model")
    if os.path.isfile(sp_model):
        added_path = os.path.join(path, "added_tokens.json")
        added = _read_json(added_path) if os.path.isfile(added_path) else {}
        if not all(isinstance(v, int) for v in added.values()):
            raise TokenizerError(f"{added_path} must map token strings to integer ids")
        eos = None if "<|endoftext|>" in added else _configured_eos(path)
        return SentencePieceTokenizer(sp_model, added_tokens=added, eod_token=eos)
    return HuggingFaceTokenizer(path)

