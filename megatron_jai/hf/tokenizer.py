"""The tokenizer of an export: files ``AutoTokenizer`` loads offline, special-token ids, and the
generation config.

Where the tokenizer comes from (:func:`find_tokenizer`): ``--tokenizer`` when given, else the
checkpoint's own ``tokenizer/`` (written by vocabulary surgery, by ``hf-to-mcore`` and by
training runs), else the tokenizer files an older ``hf-to-mcore`` kept in ``hf/``.

What is written (:func:`export_tokenizer`): the tokenizer exactly as training saw it
(:func:`megatron_jai.data.hf_tokenizer.write_hf_tokenizer`, which chat preprocessing renders
with too):

* a complete Hugging Face tokenizer (``tokenizer.json`` + ``tokenizer_config.json``, e.g. an
  extended tokenizer or an HF model's own) is copied as it is, with the sentencepiece model when
  there is one;
* a sentencepiece tokenizer (a ``.model`` file, or the Phi-3 layout: ``tokenizer.model`` +
  ``added_tokens.json`` + ``tokenizer_config.json``) also gets a ``tokenizer.json`` that encodes
  like it, its added tokens with the source's attributes (Phi-3's ``rstrip`` on ``<|user|>``,
  ``<|assistant|>``, ``<|system|>`` and ``<|end|>`` included);
* ``tokenizer_config.json`` keeps what the source says (added tokens, chat template, bos / eos /
  unk / pad) and gets what a user of the model needs and the source did not say: eos (= the
  end-of-document token of training), pad (= eos when there is none), ``model_max_length`` and the
  chat template (Phi-3's when the source has none: the toolkit's chat format). BOS is added by the
  HF tokenizer only where the source says so: pretraining data here carries no BOS.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Optional

from megatron_jai.cli import UserError
from megatron_jai.data.hf_tokenizer import PHI3_CHAT_TEMPLATE

CHAT_TOKENS = ("<|user|>", "<|assistant|>", "<|end|>")
END_OF_TURN = "<|end|>"


class TokenizerExportError(UserError):
    """A tokenizer that cannot be found or exported (one line for the user)."""


@dataclass
class ExportedTokenizer:
    vocab_size: int  # ids, specials included
    eos_token_id: int  # the end-of-document token of training
    pad_token_id: int
    bos_token_id: Optional[int]
    stop_token_ids: list  # generation stops at any of these: end of document, end of turn
    notes: list = field(default_factory=list)

    def token_ids(self) -> dict:
        """The ``*_token_id`` fields of config.json."""
        return {"bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id,
                "pad_token_id": self.pad_token_id}

    def generation_config(self) -> dict:
        stop = self.stop_token_ids[0] if len(self.stop_token_ids) == 1 else self.stop_token_ids
        return {"bos_token_id": self.bos_token_id, "eos_token_id": stop,
                "pad_token_id": self.pad_token_id}


def _tokenizer_in(directory: str) -> Optional[str]:
    """``directory`` when it holds a tokenizer, else its only sentencepiece ``*.model``, else None."""
    if any(os.path.isfile(os.path.join(directory, f)) for f in ("tokenizer.json", "tokenizer.model")):
        return directory
    models = [f for f in os.listdir(directory) if f.endswith(".model")]
    return os.path.join(directory, models[0]) if len(models) == 1 else None


def find_tokenizer(checkpoint_root: str, explicit: Optional[str] = None,
                   subdirs: tuple = ("tokenizer", "hf")) -> str:
    """The tokenizer to export with a checkpoint (see the module docstring); raises
    :class:`TokenizerExportError` asking for ``--tokenizer`` when there is none."""
    if explicit:
        from megatron_jai.paths import shared_path
        from megatron_jai.data.hf_tokenizer import SHARED_TOKENIZERS

        if explicit in SHARED_TOKENIZERS and not os.path.exists(explicit):
            explicit = shared_path("tokenizers", explicit)
        if not os.path.exists(explicit):
            raise TokenizerExportError(f"tokenizer {explicit} does not exist")
        return explicit
    for sub in subdirs:
        path = os.path.join(checkpoint_root, sub)
        if os.path.isdir(path) and _tokenizer_in(path):
            return _tokenizer_in(path)
    raise TokenizerExportError(f"checkpoint {checkpoint_root} carries no tokenizer; pass the one "
                               f"the model was trained with: --tokenizer PATH")


def _content(token) -> Optional[str]:
    return token.get("content") if isinstance(token, dict) else token


def export_tokenizer(src: str, out_dir: str, model_vocab_size: int,
                     max_length: Optional[int] = None) -> ExportedTokenizer:
    """Write the tokenizer ``src`` (a tokenizer directory or a sentencepiece ``.model``) into
    ``out_dir`` (see the module docstring); checks it fits a model of ``model_vocab_size`` ids."""
    from tokenizers import Tokenizer as FastTokenizer

    from megatron_jai.data.hf_tokenizer import TOKENIZER_CONFIG, write_hf_tokenizer
    from megatron_jai.data.tokenizer import TokenizerError, load_tokenizer

    try:
        ours = load_tokenizer(src)
    except TokenizerError as e:
        raise TokenizerExportError(str(e)) from None
    if ours.vocab_size > model_vocab_size:
        raise TokenizerExportError(f"tokenizer {src} has {ours.vocab_size} ids but the model only "
                                   f"{model_vocab_size}: not the tokenizer it was trained with")
    try:
        config = write_hf_tokenizer(src, out_dir)
    except TokenizerError as e:
        raise TokenizerExportError(str(e)) from None
    original = dict(config)
    notes = []
    fast = FastTokenizer.from_file(os.path.join(out_dir, "tokenizer.json"))
    eos = fast.id_to_token(ours.eod)
    if _content(config.get("eos_token")) not in (None, eos):
        raise TokenizerExportError(f"tokenizer {src}: eos_token {_content(config['eos_token'])!r} "
                                   f"is not the end-of-document token {eos!r} it was trained with")
    config["eos_token"] = config.get("eos_token") or eos
    config.setdefault("pad_token", config["eos_token"])
    config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
    if max_length:
        config.setdefault("model_max_length", max_length)
    has_template = "chat_template" in config or os.path.isfile(os.path.join(out_dir, "chat_template.jinja"))
    if not has_template:
        config["chat_template"] = PHI3_CHAT_TEMPLATE
        missing = [t for t in CHAT_TOKENS if fast.token_to_id(t) is None]
        if missing:
            notes.append(f"the tokenizer has no {', '.join(missing)} tokens: the Phi-3 chat template "
                         f"spells them as text")
    if config != original:
        _write_json(os.path.join(out_dir, TOKENIZER_CONFIG), config)
    specials_map = os.path.join(out_dir, "special_tokens_map.json")
    if not os.path.isfile(specials_map):
        _write_json(specials_map, {k: config[k] for k in ("bos_token", "eos_token", "unk_token",
                                                          "pad_token") if config.get(k)})

    def token_id(key):
        name = _content(config.get(key))
        tid = fast.token_to_id(name) if name else None
        if name and tid is None:
            raise TokenizerExportError(f"tokenizer {src}: {key} {name!r} is not in its vocabulary")
        return tid

    stop = [ours.eod] + [i for i in [fast.token_to_id(END_OF_TURN)] if i is not None and i != ours.eod]
    return ExportedTokenizer(vocab_size=ours.vocab_size, eos_token_id=ours.eod,
                             pad_token_id=token_id("pad_token"), bos_token_id=token_id("bos_token"),
                             stop_token_ids=stop, notes=notes)


def _write_json(path: str, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")
