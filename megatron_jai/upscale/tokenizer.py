"""Thai tokenizer adaptation: train a Thai sentencepiece BPE, merge it into a base vocabulary, and
load/measure any tokenizer (sentencepiece, Hugging Face, tiktoken, Qwen2-style byte-level BPE).

The merged vocabulary keeps every base id: the base sentencepiece pieces keep ids 0..n-1, the base's
added special tokens (Phi-3: 11 at 32000-32010) keep theirs as USER_DEFINED pieces, and the new Thai
pieces follow. Added pieces score below every base piece, so sentencepiece BPE (which merges the
adjacent pair whose union has the highest score) applies all base merges first and encodings of
text that has no Thai are unchanged.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional, Sequence

from megatron_jai.data.files import iter_documents
from megatron_jai.data.hf_tokenizer import (SHARED_TOKENIZERS, SP_MODEL_FILE, BaseTokenizer,
                                                  hf_tokenizer_from_proto, load_base_tokenizer,
                                                  read_model_proto)
from megatron_jai.data.tokenizer import TokenizerError
from megatron_jai.paths import shared_path

VOCAB_MAP_FILE = "vocab_map.json"  # old id -> new id, next to an extended tokenizer

# ------------------------------------------------------------------------------------------------
# Corpus reading (documents: megatron_jai.data.files)
# ------------------------------------------------------------------------------------------------


def iter_lines(path: str, json_key: str = "text") -> Iterator[str]:
    """What a tokens-per-character table counts: every non-empty line of every document."""
    for doc in iter_documents(path, json_key):
        for line in doc.split("\n"):
            if line.strip():
                yield line


# thaigov_v2 page boilerplate (shared/README.md): the category prefix of the title, the date line,
# the "print" button, separator lines and the closing "source: URL" line. Titles are repeated up
# to three times per page, so repeated lines inside a document are dropped as well.
_THAIGOV_TITLE_PREFIX = re.compile(r"^รัฐบาลไทย-[^-\n]*-")
_THAIGOV_DATE = re.compile(r"^วัน\S*ที่\s*\d{1,2}\s+\S+\s+\d{4}$")
_THAIGOV_SOURCE = re.compile(r"^ที่มา\s*:")
_NO_WORDS = re.compile(r"^[\W_]*$")


def clean_thaigov(doc: str) -> str:
    out, seen = [], set()
    for i, line in enumerate(doc.split("\n")):
        line = line.strip()
        if i == 0:
            line = _THAIGOV_TITLE_PREFIX.sub("", line)
        if (not line or line == "พิมพ์" or _NO_WORDS.match(line) or _THAIGOV_DATE.match(line)
                or _THAIGOV_SOURCE.match(line) or line in seen):
            continue
        seen.add(line)
        out.append(line)
    return "\n".join(out)


CLEANERS = {"none": lambda doc: doc, "thaigov": clean_thaigov}


def split_sentences(doc: str, max_chars: int = 1000) -> Iterator[str]:
    """Lines of a document; lines longer than ``max_chars`` are cut at spaces (Thai marks sentence
    and phrase ends with a space) into chunks of at most ``max_chars`` characters."""
    for line in doc.split("\n"):
        line = line.strip()
        while len(line) > max_chars:
            cut = line.rfind(" ", 0, max_chars + 1)
            if cut <= 0:
                cut = max_chars
            head, line = line[:cut].strip(), line[cut:].strip()
            if head:
                yield head
        if line:
            yield line


# ------------------------------------------------------------------------------------------------
# Training a Thai BPE
# ------------------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    model_path: str
    vocab_size: int
    sentences: int
    characters: int
    seconds: float
    special_tokens: int = 0  # added above the pieces (special_tokens_from)


MIN_BPE_VOCAB = 300  # byte fallback alone takes 259 pieces


def check_bpe_options(vocab_size: int, clean: str) -> None:
    """The options :func:`train_bpe` refuses, checked before any work."""
    if vocab_size < MIN_BPE_VOCAB:
        raise TokenizerError(f"a BPE vocabulary needs at least {MIN_BPE_VOCAB} pieces (byte "
                             f"fallback alone takes 259), got {vocab_size}")
    if clean not in CLEANERS:
        raise TokenizerError(f"unknown cleaner {clean!r}; choose from {sorted(CLEANERS)}")


def train_bpe(
    inputs: Sequence[str],
    vocab_size: int,
    out_dir: str,
    json_key: str = "text",
    max_sentences: int = 2_000_000,
    threads: int = os.cpu_count() or 1,
    character_coverage: float = 0.9995,
    max_piece_length: int = 16,
    clean: str = "none",
    max_sentence_chars: int = 1000,
    seed: int = 0,
    special_tokens_from: Optional[str] = None,
    force: bool = False,
    progress: bool = True,
    verbose: bool = True,
) -> TrainResult:
    """Train a sentencepiece BPE (byte fallback) on the documents of ``inputs``; writes
    ``out_dir/tokenizer.model`` and ``out_dir/train_args.json``. With ``special_tokens_from`` (a
    tokenizer directory such as phi3) it also takes that tokenizer's added special tokens and
    config, chat template included (:func:`adopt_special_tokens`): the result is a base tokenizer
    in the Phi-3 layout.

    Normalisation matches the Llama-2/Phi-3 base model (identity, dummy prefix, whitespace kept,
    digits split), so that the learned pieces are spelled the way the base model sees text and can
    be merged into its vocabulary.
    """
    import sentencepiece as spm
    from megatron_jai.cli import progress as progress_bar

    check_bpe_options(vocab_size, clean)
    for path in inputs:
        if not os.path.isfile(path):
            raise TokenizerError(f"no such file: {path}")
    cleaner = CLEANERS[clean]
    if special_tokens_from is not None:
        load_base_tokenizer(special_tokens_from)  # a bad source fails before any work
    if os.path.exists(out_dir) and not force:
        raise TokenizerError(f"{out_dir} exists (use --force to replace it)")
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    # Everything is built in a temporary sibling that becomes out_dir only when complete.
    tmp_dir = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.", dir=parent)
    result_dir = os.path.join(tmp_dir, "result")
    os.makedirs(result_dir)
    try:
        # Sentences go through a temporary file: sentencepiece then samples ``max_sentences`` of
        # them uniformly (reservoir) and trains with all threads.
        corpus = os.path.join(tmp_dir, "sentences.txt")
        n_sent = n_chars = 0
        with open(corpus, "w", encoding="utf-8") as f:
            for path in inputs:
                docs = progress_bar(iter_documents(path, json_key), enabled=progress,
                                    desc=f"reading {os.path.basename(path)}", unit=" docs")
                for doc in docs:
                    for sent in split_sentences(cleaner(doc), max_sentence_chars):
                        f.write(sent)
                        f.write("\n")
                        n_sent += 1
                        n_chars += len(sent)
        if n_sent == 0:
            raise TokenizerError("the inputs hold no text")
        prefix = os.path.join(tmp_dir, "tokenizer")
        start = time.time()
        spm.set_random_generator_seed(seed)
        try:
            spm.SentencePieceTrainer.train(
                input=corpus,
                model_prefix=prefix,
                model_type="bpe",
                vocab_size=vocab_size,
                character_coverage=character_coverage,
                byte_fallback=True,
                normalization_rule_name="identity",
                add_dummy_prefix=True,
                remove_extra_whitespaces=False,
                split_digits=True,
                allow_whitespace_only_pieces=True,
                max_sentencepiece_length=max_piece_length,
                max_sentence_length=4 * max_sentence_chars + 16,  # bytes (UTF-8 Thai: 3 per char)
                input_sentence_size=max_sentences,
                shuffle_input_sentence=True,
                num_threads=threads,
                unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                minloglevel=0 if verbose else 2,
            )
        except RuntimeError as err:  # e.g. a vocabulary size the corpus cannot fill
            raise TokenizerError(f"sentencepiece training failed: {err}") from None
        seconds = time.time() - start
        # The trainer spec records the temporary paths; store the inputs' names instead so that
        # retraining with the same command gives a byte-identical model.
        proto = read_model_proto(prefix + ".model")
        del proto.trainer_spec.input[:]
        proto.trainer_spec.input.extend(os.path.basename(p) for p in inputs)
        proto.trainer_spec.model_prefix = "tokenizer"
        with open(os.path.join(result_dir, SP_MODEL_FILE), "wb") as f:
            f.write(proto.SerializeToString())
        added = {}
        if special_tokens_from is not None:
            added, config = adopt_special_tokens(proto, special_tokens_from)
            _write_json(os.path.join(result_dir, "added_tokens.json"), added)
            _write_json(os.path.join(result_dir, "tokenizer_config.json"), config)
        args = dict(inputs=[os.path.abspath(p) for p in inputs], vocab_size=vocab_size,
                    json_key=json_key, max_sentences=max_sentences, clean=clean,
                    character_coverage=character_coverage, max_piece_length=max_piece_length,
                    max_sentence_chars=max_sentence_chars, special_tokens_from=special_tokens_from,
                    sentences=n_sent, characters=n_chars,
                    train_seconds=round(seconds, 1))
        _write_json(os.path.join(result_dir, "train_args.json"), args)
        os.chmod(result_dir, 0o755)
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir)
        os.replace(result_dir, out_dir)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return TrainResult(os.path.join(out_dir, SP_MODEL_FILE), vocab_size, n_sent, n_chars, seconds,
                       len(added))


def _write_json(path: str, obj, indent=1) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=indent, ensure_ascii=False)
        f.write("\n")
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------
# Loading any tokenizer for measurement
# ------------------------------------------------------------------------------------------------

# Split patterns of shared/README.md (Llama-3 tiktoken; Qwen2 = the same with unbounded digit runs).
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                  r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_PATTERN = LLAMA3_PATTERN.replace(r"\p{N}{1,3}", r"\p{N}")

@dataclass
class TextEncoder:
    """A tokenizer reduced to what measurement needs: plain encoding, no BOS/EOS added."""

    name: str
    kind: str  # sentencepiece | hf | tiktoken | byte-bpe
    encode_batch: Callable[[List[str]], List[List[int]]]
    vocab_size: int

    def encode(self, text: str) -> List[int]:
        return self.encode_batch([text])[0]


def _is_sentencepiece(path: str) -> bool:
    import sentencepiece as spm

    try:
        spm.SentencePieceProcessor(model_file=path)
        return True
    except (RuntimeError, OSError):
        return False


def load_text_encoder(spec: str, threads: int = os.cpu_count() or 1) -> TextEncoder:
    """``spec``: a name in shared/tokenizers (phi3, llama3, qwen2), a sentencepiece ``.model``, a
    tiktoken ranks file, or a directory holding ``tokenizer.json`` (Hugging Face fast tokenizer),
    ``vocab.json`` + ``merges.txt`` (byte-level BPE, built like Qwen2) or ``tokenizer.model``."""
    path = shared_path("tokenizers", spec) if spec in SHARED_TOKENIZERS and not os.path.exists(spec) else spec
    name = spec
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "tokenizer.json")):
            from tokenizers import Tokenizer

            tok = Tokenizer.from_file(os.path.join(path, "tokenizer.json"))

            def enc_hf(lines):
                return [e.ids for e in tok.encode_batch(lines, add_special_tokens=False)]

            return TextEncoder(name, "hf", enc_hf, tok.get_vocab_size(with_added_tokens=True))
        vocab_json, merges_txt = os.path.join(path, "vocab.json"), os.path.join(path, "merges.txt")
        if os.path.isfile(vocab_json) and os.path.isfile(merges_txt):
            tok = build_byte_level_bpe(vocab_json, merges_txt)

            def enc_bl(lines):
                return [e.ids for e in tok.encode_batch(lines, add_special_tokens=False)]

            return TextEncoder(name, "byte-bpe", enc_bl, tok.get_vocab_size())
        if os.path.isfile(os.path.join(path, "tokenizer.model")):
            path = os.path.join(path, "tokenizer.model")
        else:
            raise TokenizerError(f"{spec}: no tokenizer.json, vocab.json+merges.txt or "
                                 f"tokenizer.model in it")
    if not os.path.isfile(path):
        raise TokenizerError(f"no such tokenizer: {spec} (a file, a directory, or one of "
                             f"{', '.join(SHARED_TOKENIZERS)})")
    if _is_sentencepiece(path):
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=path)

        def enc_sp(lines):
            return sp.encode(lines, num_threads=threads)

        return TextEncoder(name, "sentencepiece", enc_sp, sp.get_piece_size())
    return _load_tiktoken(path, name)


def _load_tiktoken(path: str, name: str) -> TextEncoder:
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    try:
        ranks = load_tiktoken_bpe(path)
    except Exception as e:  # noqa: BLE001 - any parse failure means "not a tiktoken file"
        raise TokenizerError(f"{path}: neither a sentencepiece model nor tiktoken ranks "
                             f"({e})") from None
    enc = tiktoken.Encoding(name=os.path.basename(path), pat_str=LLAMA3_PATTERN,
                            mergeable_ranks=ranks, special_tokens={})

    def enc_tt(lines):
        return enc.encode_ordinary_batch(lines)

    return TextEncoder(name, "tiktoken", enc_tt, len(ranks))


def build_byte_level_bpe(vocab_json: str, merges_txt: str, pattern: str = QWEN2_PATTERN):
    """A byte-level BPE (Qwen2 layout) from ``vocab.json`` + ``merges.txt``: NFC, the split
    pattern (isolated), byte-level mapping without its own regex."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    tok = Tokenizer(models.BPE.from_file(vocab_json, merges_txt))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    return tok


# ------------------------------------------------------------------------------------------------
# Tokens per character
# ------------------------------------------------------------------------------------------------


@dataclass
class Fertility:
    tokenizer: str
    text: str
    lines: int
    characters: int
    utf8_bytes: int
    tokens: int

    @property
    def tokens_per_char(self) -> float:
        return self.tokens / max(self.characters, 1)

    @property
    def bytes_per_token(self) -> float:
        return self.utf8_bytes / max(self.tokens, 1)


def measure_fertility(encoder: TextEncoder, lines: Sequence[str], text_name: str,
                      batch: int = 4096) -> Fertility:
    """Tokens per character of ``lines``, each line encoded on its own without BOS."""
    tokens = chars = nbytes = 0
    for i in range(0, len(lines), batch):
        chunk = list(lines[i:i + batch])
        tokens += sum(len(ids) for ids in encoder.encode_batch(chunk))
        chars += sum(len(s) for s in chunk)
        nbytes += sum(len(s.encode("utf-8")) for s in chunk)
    return Fertility(encoder.name, text_name, len(lines), chars, nbytes, tokens)


def fertility_table(results: Sequence[Fertility]) -> str:
    """A Markdown table: one row per tokenizer, tokens/char and bytes/token per text."""
    tokenizers = list(dict.fromkeys(r.tokenizer for r in results))
    texts = list(dict.fromkeys(r.text for r in results))
    by = {(r.tokenizer, r.text): r for r in results}
    head = ["tokenizer"]
    for t in texts:
        head += [f"{t} tok/char", f"{t} bytes/tok"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for tk in tokenizers:
        cells = [tk]
        for t in texts:
            r = by.get((tk, t))
            cells += [f"{r.tokens_per_char:.3f}", f"{r.bytes_per_token:.2f}"] if r else ["", ""]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


# ------------------------------------------------------------------------------------------------
# Extending a base vocabulary with Thai pieces
# ------------------------------------------------------------------------------------------------

def is_thai_char(c: str) -> bool:
    return "\u0e00" <= c <= "\u0e7f"


def is_thai_piece(piece: str) -> bool:
    """Thai script only, with at most a leading word-boundary marker: such pieces never touch the
    encoding of text without Thai."""
    body = piece[1:] if piece.startswith("\u2581") else piece
    return bool(body) and all(is_thai_char(c) for c in body)


def _any_piece(piece: str) -> bool:
    return True


PIECE_FILTERS = {"thai": is_thai_piece, "all": _any_piece}


def adopt_special_tokens(proto, source: str) -> tuple:
    """The added special tokens and ``tokenizer_config.json`` of the tokenizer ``source`` (a
    directory, or phi3) for the sentencepiece model ``proto``, as a user moves a chat format onto a
    new tokenizer: the tokens keep their order and are stacked right above the model's pieces
    (Phi-3's ``<|endoftext|>`` = 32000 ... ``<|user|>`` = 32010 become N ... N+10 above N pieces);
    the config (chat template, bos/eos/unk/pad names, token flags) is the source's with those ids,
    without what only holds for the source's model (its padded vocabulary, context length).
    Returns ``(added_tokens, tokenizer_config)``."""
    src = load_base_tokenizer(source)
    pieces = {p.piece: i for i, p in enumerate(proto.pieces)}
    added = {}
    for content, _ in sorted(src.specials.items(), key=lambda kv: kv[1]):
        if content in pieces:
            raise TokenizerError(f"special token {content!r} of {source} is already a piece of "
                                 f"the trained model")
        added[content] = len(proto.pieces) + len(added)
    config = {k: v for k, v in src.config.items() if k not in ("padded_vocab_size", "model_max_length")}
    decoder = {}
    for sid, token in src.config.get("added_tokens_decoder", {}).items():
        content = token.get("content")
        new_id = added.get(content, pieces.get(content))
        if new_id is None:
            raise TokenizerError(f"{source}: token {content!r} (id {sid}) is neither a special "
                                 f"token nor a piece of the trained model")
        decoder[str(new_id)] = token
    if decoder:
        config["added_tokens_decoder"] = dict(sorted(decoder.items(), key=lambda kv: int(kv[0])))
    for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
        name = config.get(key)
        name = name.get("content") if isinstance(name, dict) else name
        if name and name not in added and name not in pieces:
            raise TokenizerError(f"{source}: {key} {name!r} is not a token of the trained model")
    return added, config


@dataclass
class ExtendResult:
    out_dir: str
    base_vocab: int
    vocab_size: int
    added: int
    dropped_unreachable: int
    rounds: int


def unreachable_pieces(proto, first_new: int, threads: int) -> List[int]:
    """Ids >= ``first_new`` of NORMAL pieces that encoding their own surface text does not give.

    Encoded without the dummy prefix so that a piece without a leading "▁" is spelled exactly."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2

    check = sp_pb2.ModelProto()
    check.CopyFrom(proto)
    check.normalizer_spec.add_dummy_prefix = False
    sp = spm.SentencePieceProcessor(model_proto=check.SerializeToString())
    ids = [i for i in range(first_new, len(proto.pieces))
           if proto.pieces[i].type == sp_pb2.ModelProto.SentencePiece.NORMAL]
    surfaces = [proto.pieces[i].piece.replace("\u2581", " ") for i in ids]
    encoded = sp.encode(surfaces, num_threads=threads)
    return [i for i, enc in zip(ids, encoded) if enc != [i]]


def added_piece_scores(min_base_score: float, n: int) -> List[float]:
    """``n`` strictly decreasing scores below ``min_base_score``, exact in float32 (the model
    stores float32; Llama-2 gives whitespace-only pieces -1e9, where float32 steps are 64 apart:
    consecutive integers there would collapse into ties and reorder the merges)."""
    import numpy as np

    step = float(np.spacing(np.float32(2 * abs(min_base_score) + 2 * n + 1)))
    step = max(step, 1.0)
    scores = [float(np.float32(min_base_score - step * (k + 1))) for k in range(n)]
    if any(b >= a for a, b in zip([min_base_score] + scores, scores)):
        raise ValueError(f"cannot place {n} distinct float32 scores below {min_base_score}")
    return scores


def merge_pieces(base: BaseTokenizer, candidates: Sequence[str], n_new: int,
                 threads: int = os.cpu_count() or 1, max_rounds: int = 50,
                 log: Callable[[str], None] = lambda s: None):
    """The merged ModelProto: base pieces, base specials (USER_DEFINED, at their ids), then the
    first ``n_new`` candidates that the merged model can emit (unreachable ones dropped and
    replaced by the next candidates until none is left). Returns (proto, dropped, rounds)."""
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2

    Piece = sp_pb2.ModelProto.SentencePiece
    special_ids = sorted(base.specials.values())
    expected = list(range(base.sp_size, base.sp_size + len(special_ids)))
    if special_ids != expected:
        raise TokenizerError(f"base special tokens must have consecutive ids right after the "
                             f"{base.sp_size} sentencepiece pieces; got {special_ids}")
    by_id = {i: c for c, i in base.specials.items()}
    base_scores = [p.score for p in base.proto.pieces if p.type == Piece.NORMAL]
    scores = added_piece_scores(min(base_scores) if base_scores else 0.0, n_new)
    first_new = base.sp_size + len(special_ids)
    rejected: set = set()
    pool = list(candidates)
    rounds = 0
    while True:
        rounds += 1
        chosen = [c for c in pool if c not in rejected][:n_new]
        proto = sp_pb2.ModelProto()
        proto.CopyFrom(base.proto)
        for sid in special_ids:
            proto.pieces.add(piece=by_id[sid], score=0.0, type=Piece.USER_DEFINED)
        for k, piece in enumerate(chosen):
            proto.pieces.add(piece=piece, score=scores[k], type=Piece.NORMAL)
        proto.trainer_spec.vocab_size = len(proto.pieces)
        bad = unreachable_pieces(proto, first_new, threads)
        log(f"round {rounds}: {len(chosen)} added, {len(bad)} unreachable")
        if not bad:
            if len(chosen) < n_new:
                raise TokenizerError(f"only {len(chosen)} usable new pieces, {n_new} needed: train the "
                                     f"added tokenizer with a larger --vocab-size")
            return proto, len(rejected), rounds
        if rounds >= max_rounds:
            raise TokenizerError(f"{len(bad)} added pieces still unreachable after {rounds} rounds; "
                                 f"train the added tokenizer with other settings")
        rejected.update(proto.pieces[i].piece for i in bad)


def candidate_pieces(base: BaseTokenizer, add_proto, piece_filter: Callable[[str], bool]) -> List[str]:
    """New pieces of ``add_proto`` in its merge order, each after every character it is spelled
    with (a character that is not itself a piece would make sentencepiece and HF BPE disagree:
    sentencepiece merges unknown characters, HF byte-falls them back first)."""
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2

    Piece = sp_pb2.ModelProto.SentencePiece
    have = {p.piece for p in base.proto.pieces} | set(base.specials)
    normal = [p.piece for p in add_proto.pieces if p.type == Piece.NORMAL]
    out, seen = [], set(have)
    for piece in normal:
        if piece in seen or not piece_filter(piece):
            continue
        for c in piece:
            if c not in seen and (c == "\u2581" or piece_filter(c)):
                out.append(c)
                seen.add(c)
        if piece not in seen:
            out.append(piece)
            seen.add(piece)
    return out


def hf_tokenizer_config(base: BaseTokenizer, proto, specials: dict, padded_vocab: int,
                        add_bos: bool = True) -> tuple:
    """``(tokenizer_config.json, special_tokens_map.json)`` dicts of a fast tokenizer made by
    :func:`hf_tokenizer_from_proto`: the base's config with the added tokens of ``proto`` and
    ``specials``; ``add_bos`` is the default of ``add_bos_token`` when the base does not set it."""
    ts = proto.trainer_spec
    unk, bos, eos = (proto.pieces[i].piece if i >= 0 else None
                     for i in (ts.unk_id, ts.bos_id, ts.eos_id))
    cfg = dict(base.config)
    decoder = {}
    for i in (ts.unk_id, ts.bos_id, ts.eos_id):
        if i >= 0:
            decoder[str(i)] = dict(content=proto.pieces[i].piece, special=True, lstrip=False,
                                   rstrip=False, normalized=False, single_word=False)
    for content, i in sorted(specials.items(), key=lambda kv: kv[1]):
        # rstrip off (Phi-3 sets it on four tokens): sentencepiece cannot strip, and both
        # tokenizers must encode the same text to the same ids.
        decoder[str(i)] = dict(content=content, special=True, lstrip=False, rstrip=False,
                               normalized=False, single_word=False)
    cfg.update(tokenizer_class="PreTrainedTokenizerFast", added_tokens_decoder=decoder,
               bos_token=cfg.get("bos_token", bos), eos_token=cfg.get("eos_token", eos),
               unk_token=cfg.get("unk_token", unk), add_bos_token=cfg.get("add_bos_token", add_bos),
               add_eos_token=cfg.get("add_eos_token", False), padded_vocab_size=padded_vocab)
    cfg.pop("legacy", None)
    special_map = {k: cfg[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token") if cfg.get(k)}
    extra = [c for c in specials if c not in special_map.values()]
    if extra:
        special_map["additional_special_tokens"] = sorted(extra, key=specials.get)
    return cfg, special_map


def extend_tokenizer(base_path: str, add_path: str, target_vocab: int, out_dir: str,
                     pieces: str = "thai", threads: int = os.cpu_count() or 1,
                     make_vocab_size_divisible_by: int = 128, force: bool = False,
                     log: Callable[[str], None] = lambda s: None) -> ExtendResult:
    """Merge the pieces of the sentencepiece model ``add_path`` (file or dir) into the base
    tokenizer; ``target_vocab`` = total ids of the result. Writes ``out_dir`` with
    ``tokenizer.model``, the HF files, ``added_tokens.json`` and ``vocab_map.json``."""
    if pieces not in PIECE_FILTERS:
        raise TokenizerError(f"unknown piece filter {pieces!r}; choose from {sorted(PIECE_FILTERS)}")
    if os.path.exists(out_dir) and not force:
        raise TokenizerError(f"{out_dir} exists (use --force to replace it)")
    base = load_base_tokenizer(base_path)
    add_file = os.path.join(add_path, SP_MODEL_FILE) if os.path.isdir(add_path) else add_path
    if not os.path.isfile(add_file):
        raise TokenizerError(f"no sentencepiece model at {add_path}")
    add_proto = read_model_proto(add_file)
    n_new = target_vocab - base.vocab_size
    if n_new <= 0:
        raise TokenizerError(f"--target-vocab {target_vocab} must exceed the base vocabulary "
                             f"({base.vocab_size})")
    for field in ("add_dummy_prefix", "remove_extra_whitespaces"):
        if getattr(add_proto.normalizer_spec, field) != getattr(base.proto.normalizer_spec, field):
            raise TokenizerError(f"{add_file}: normalizer {field} differs from the base tokenizer's; "
                                 f"train it with tools/train_tokenizer.py")
    candidates = candidate_pieces(base, add_proto, PIECE_FILTERS[pieces])
    proto, dropped, rounds = merge_pieces(base, candidates, n_new, threads=threads, log=log)

    specials = dict(base.specials)
    padded = -(-target_vocab // make_vocab_size_divisible_by) * make_vocab_size_divisible_by
    cfg, special_map = hf_tokenizer_config(base, proto, specials, padded)
    hf = hf_tokenizer_from_proto(proto, specials)

    parent = os.path.dirname(os.path.abspath(out_dir)) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.", dir=parent)
    try:
        with open(os.path.join(tmp, SP_MODEL_FILE), "wb") as f:
            f.write(proto.SerializeToString())
        hf.save(os.path.join(tmp, "tokenizer.json"))
        _write_json(os.path.join(tmp, "tokenizer_config.json"), cfg)
        _write_json(os.path.join(tmp, "special_tokens_map.json"), special_map)
        _write_json(os.path.join(tmp, "added_tokens.json"), specials)
        base_ids = list(range(base.vocab_size))  # every base id keeps its meaning and its id
        _write_json(os.path.join(tmp, VOCAB_MAP_FILE), dict(
            base_tokenizer=os.path.abspath(base.dir), added_model=os.path.abspath(add_file),
            base_vocab_size=base.vocab_size, vocab_size=target_vocab, padded_vocab_size=padded,
            first_new_id=base.vocab_size, old_to_new=base_ids), indent=None)
        os.chmod(tmp, 0o755)
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ExtendResult(out_dir, base.vocab_size, len(proto.pieces), n_new, dropped, rounds)


def load_vocab_map(tokenizer_dir: str) -> dict:
    path = os.path.join(tokenizer_dir, VOCAB_MAP_FILE)
    if not os.path.isfile(path):
        raise TokenizerError(f"{tokenizer_dir}: no {VOCAB_MAP_FILE} "
                             f"(write the tokenizer with tools/extend_tokenizer.py)")
    with open(path) as f:
        return json.load(f)
