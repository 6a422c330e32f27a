"""The Hugging Face form of the project's tokenizers (:func:`write_hf_tokenizer`), which chat
preprocessing renders with and the export writes, and what it is made of: sentencepiece models in
the base-tokenizer layout (a model, the Hugging Face added tokens above it, a config: Phi-3's) and
their exact conversion to a fast tokenizer (shared with the tokenizer extension)."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Optional

from megatron_jai.data.tokenizer import TokenizerError
from megatron_jai.paths import shared_path

SP_MODEL_FILE = "tokenizer.model"
# Short names for the reference tokenizers in shared/tokenizers.
SHARED_TOKENIZERS = ("phi3", "llama3", "qwen2")
TOKENIZER_CONFIG = "tokenizer_config.json"
# Phi-3's chat format (microsoft/Phi-3-medium-4k-instruct), the format of this toolkit: the template
# of a tokenizer that has none.
PHI3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') %}"
    "{{'<|user|>' + '\n' + message['content'] + '<|end|>' + '\n' + '<|assistant|>' + '\n'}}"
    "{% elif (message['role'] == 'assistant') %}{{message['content'] + '<|end|>' + '\n'}}"
    "{% endif %}{% endfor %}")


@dataclass
class BaseTokenizer:
    """A base tokenizer directory: sentencepiece model + HF added special tokens + config."""

    dir: str
    proto: object  # sentencepiece ModelProto
    specials: dict  # content -> id (added tokens above the sentencepiece pieces)
    config: dict  # tokenizer_config.json (may be empty)

    @property
    def sp_size(self) -> int:
        return len(self.proto.pieces)

    @property
    def vocab_size(self) -> int:
        return max([self.sp_size - 1, *self.specials.values()]) + 1


def read_model_proto(path: str):
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2

    proto = sp_pb2.ModelProto()
    try:
        with open(path, "rb") as f:
            proto.ParseFromString(f.read())
    except Exception as e:  # noqa: BLE001 - protobuf raises its own DecodeError
        raise TokenizerError(f"{path}: not a sentencepiece model ({e})") from None
    if not proto.pieces:
        raise TokenizerError(f"{path}: not a sentencepiece model (no pieces)")
    return proto


def load_base_tokenizer(path: str) -> BaseTokenizer:
    """A directory with ``tokenizer.model`` (+ optional ``added_tokens.json`` and
    ``tokenizer_config.json``), a bare ``.model``, or phi3 (shared/tokenizers/phi3)."""
    if path in SHARED_TOKENIZERS and not os.path.exists(path):
        path = shared_path("tokenizers", path)
    if os.path.isfile(path):
        return BaseTokenizer(os.path.dirname(path), read_model_proto(path), {}, {})
    model = os.path.join(path, SP_MODEL_FILE)
    if not os.path.isfile(model):
        raise TokenizerError(f"{path}: no {SP_MODEL_FILE} (a sentencepiece base tokenizer is "
                             f"needed)")
    proto = read_model_proto(model)
    specials, config = {}, {}
    added = os.path.join(path, "added_tokens.json")
    if os.path.isfile(added):
        with open(added) as f:
            specials = {k: int(v) for k, v in json.load(f).items()}
    cfg = os.path.join(path, "tokenizer_config.json")
    if os.path.isfile(cfg):
        with open(cfg) as f:
            config = json.load(f)
        for sid, tok in config.get("added_tokens_decoder", {}).items():
            if int(sid) >= len(proto.pieces):
                specials.setdefault(tok["content"], int(sid))
    for content, sid in specials.items():
        if sid < len(proto.pieces) and proto.pieces[sid].piece != content:
            raise TokenizerError(f"{path}: added token {content!r} has id {sid}, which is the "
                                 f"sentencepiece piece {proto.pieces[sid].piece!r}")
    specials = {c: i for c, i in specials.items() if i >= len(proto.pieces)}
    return BaseTokenizer(path, proto, specials, config)


def _bpe_model(proto, Piece, models):
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    mergeable = {p.piece for p in proto.pieces if p.type == Piece.NORMAL}
    merges = []
    for i, p in enumerate(proto.pieces):
        if p.type != Piece.NORMAL or len(p.piece) < 2:
            continue
        s = p.piece
        splits = [(s[:k], s[k:]) for k in range(1, len(s)) if s[:k] in mergeable and s[k:] in mergeable]
        for left, right in sorted(splits, key=lambda lr: (vocab[lr[0]], vocab[lr[1]])):
            merges.append((-p.score, i, vocab[left], left, right))
    merges.sort(key=lambda m: m[:3])
    return models.BPE(vocab=vocab, merges=[(m[3], m[4]) for m in merges],
                      unk_token=proto.pieces[proto.trainer_spec.unk_id].piece,
                      byte_fallback=proto.trainer_spec.byte_fallback, fuse_unk=True)


def hf_tokenizer_from_proto(proto, specials: dict, add_bos: bool = True,
                            attributes: Optional[dict] = None):
    """A ``tokenizers.Tokenizer`` that encodes like the sentencepiece BPE or unigram ``proto`` (Llama-style,
    non-legacy: the word-boundary "▁" is prepended to the first segment only), with the model's
    normalizer (e.g. NFKC and whitespace folding of a sentencepiece default model) and a BOS
    post-processor when ``add_bos``. ``attributes`` (content -> ``rstrip``, ``lstrip``,
    ``normalized``, ``special``, ``single_word``) override the added tokens' defaults.

    sentencepiece BPE merges the adjacent pair whose union has the highest score; HF BPE merges the
    pair of lowest rank. Listing every split (left, right) of every piece, ranked by the piece's
    score, makes the two agree."""
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2
    from tokenizers import (AddedToken, Regex, Tokenizer, decoders, models, normalizers,
                            pre_tokenizers, processors)

    Piece = sp_pb2.ModelProto.SentencePiece
    ts = proto.trainer_spec
    if ts.model_type == sp_pb2.TrainerSpec.UNIGRAM:  # the same Viterbi over the same scores
        model = models.Unigram([(p.piece, p.score) for p in proto.pieces], unk_id=ts.unk_id,
                               byte_fallback=ts.byte_fallback)
    elif ts.model_type == sp_pb2.TrainerSpec.BPE:
        model = _bpe_model(proto, Piece, models)
    else:
        raise TokenizerError(f"a sentencepiece {sp_pb2.TrainerSpec.ModelType.Name(ts.model_type)} "
                             f"model has no exact Hugging Face form (BPE and unigram have)")
    tok = Tokenizer(model)
    spec = proto.normalizer_spec
    steps = [normalizers.Precompiled(spec.precompiled_charsmap)] if spec.precompiled_charsmap else []
    if spec.remove_extra_whitespaces:  # spaces only, as sentencepiece does
        # Leading spaces become the word boundary itself: removing them would shift the text off
        # offset 0, where the pre-tokenizer's "first" scheme adds the dummy prefix.
        steps += [normalizers.Replace(Regex(r"\A +\z| +\z"), ""),
                  normalizers.Replace(Regex(r"\A +"), "\u2581"), normalizers.Replace(Regex(" {2,}"), " ")]
    if steps:
        tok.normalizer = normalizers.Sequence(steps)
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    controls = [proto.pieces[i].piece for i in (ts.unk_id, ts.bos_id, ts.eos_id) if i >= 0]
    defaults = {"special": True, "normalized": False}
    tok.add_tokens([AddedToken(c, **{**defaults, **(attributes or {}).get(c, {})})
                    for c in controls + sorted(specials, key=specials.get)])
    if add_bos and ts.bos_id >= 0:
        bos = proto.pieces[ts.bos_id].piece
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, ts.bos_id)])
    return tok



def write_hf_tokenizer(src: str, out_dir: str) -> dict:
    """Write the Hugging Face form of the tokenizer ``src`` (a tokenizer directory or a
    sentencepiece ``.model``) into ``out_dir``; returns its ``tokenizer_config.json``. The one
    definition of what ``AutoTokenizer`` loads for a tokenizer: chat data is rendered with it and
    the export writes it, so both give the same ids.

    * A directory with ``tokenizer.json`` is copied as it is.
    * A sentencepiece model (a ``.model``; a directory with ``tokenizer.model``, optionally
      ``added_tokens.json`` and ``tokenizer_config.json``: Phi-3's layout) gets a ``tokenizer.json``
      that encodes like sentencepiece; every added token keeps the attributes (``rstrip``,
      ``lstrip``, ``normalized``, ``special``, ``single_word``) of the source's
      ``added_tokens_decoder``, and the source's ``tokenizer_config.json`` is kept, with
      ``tokenizer_class`` ``PreTrainedTokenizerFast`` (read ``tokenizer.json`` as it is) and the
      model's own ``<unk>`` / ``<s>`` where it names none. BOS is added by the tokenizer only where
      the source says so (``add_bos_token``)."""
    import shutil

    from megatron_jai.checkpoint.dist import tokenizer_files

    if os.path.isdir(src) and os.path.isfile(os.path.join(src, "tokenizer.json")):
        for name, path in tokenizer_files(src).items():
            shutil.copyfile(path, os.path.join(out_dir, name))
        config_path = os.path.join(src, TOKENIZER_CONFIG)
        if not os.path.isfile(config_path):
            return {}
        with open(config_path, encoding="utf-8") as f:
            try:
                return json.load(f)
            except ValueError as err:
                raise TokenizerError(f"{config_path} is not valid JSON: {err}") from None
    try:
        base = load_base_tokenizer(src)
    except ValueError as err:
        raise TokenizerError(str(err)) from None
    config = dict(base.config)
    add_bos = bool(config.get("add_bos_token", False))
    attributes = {t["content"]: {k: v for k, v in t.items() if k != "content"}
                  for t in config.get("added_tokens_decoder", {}).values()}
    hf_tokenizer_from_proto(base.proto, base.specials, add_bos, attributes).save(
        os.path.join(out_dir, "tokenizer.json"))
    sp_model = src if os.path.isfile(src) else os.path.join(src, "tokenizer.model")
    shutil.copyfile(sp_model, os.path.join(out_dir, "tokenizer.model"))
    if base.specials:
        with open(os.path.join(out_dir, "added_tokens.json"), "w", encoding="utf-8") as f:
            json.dump(base.specials, f, indent=2, ensure_ascii=False)
    spec = base.proto.trainer_spec
    for key, i in (("unk_token", spec.unk_id), ("bos_token", spec.bos_id)):
        if i >= 0:
            config.setdefault(key, base.proto.pieces[i].piece)
    config.update(tokenizer_class="PreTrainedTokenizerFast", add_bos_token=add_bos)
    with open(os.path.join(out_dir, TOKENIZER_CONFIG), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, ensure_ascii=False)
    return config
