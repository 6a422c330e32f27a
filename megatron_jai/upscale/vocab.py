"""Embedding surgery for an extended tokenizer (``tools/upscale.py vocab``).

Given a checkpoint trained with a base tokenizer and a tokenizer extended from it by
``tools/extend_tokenizer.py`` (which writes ``vocab_map.json``: old id -> new id):

- the rows of base ids move to their new ids (identity for the Phi-3 + Thai tokenizer), unchanged;
- the row of every new token, in the input embedding AND the output layer, is the mean of the base
  rows of the pieces the *base* tokenizer splits the token's text into (byte fallback included),
  optionally rescaled to the mean norm of the base rows (``--norm-correction``: a mean of several
  vectors is shorter than each of them);
- padding rows up to ``ModelConfig.padded_vocab_size`` (a multiple of 128, so any TP divides it)
  are zero;
- every other tensor is copied, streaming (one layer of one tensor in memory at a time).

The base tokenizer (the one the checkpoint was trained with) is, unless given, the one the
checkpoint carries in ``tokenizer/`` (written by ``hf-to-mcore`` and by training), else Phi-3's.
The checkpoint stores global tensors, so the result loads at any TP (vocab-parallel shards are
cut at load time).
"""
from __future__ import annotations

import argparse
import os
import shutil
import time
from typing import List, Optional

import torch

from megatron_jai.checkpoint.dist import TOKENIZER_SUBDIR
from megatron_jai.data.hf_tokenizer import SP_MODEL_FILE, load_base_tokenizer
from megatron_jai.data.tokenizer import TokenizerError
from megatron_jai.paths import shared_path
from megatron_jai.upscale.tokenizer import load_vocab_map

EMBEDDING_KEY = "embedding.word_embeddings.weight"
OUTPUT_KEY = "output_layer.weight"


def base_splits(base_tokenizer: str, new_tokenizer: str, new_ids: List[int]) -> List[List[int]]:
    """For each new id: the base-tokenizer ids its text encodes to (no dummy prefix, so that a
    piece without a leading word boundary is spelled exactly)."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2

    base = load_base_tokenizer(base_tokenizer)
    new = load_base_tokenizer(new_tokenizer)
    for i in range(base.sp_size):
        if new.proto.pieces[i].piece != base.proto.pieces[i].piece:
            raise TokenizerError(f"{new_tokenizer} was not extended from {base_tokenizer}: piece "
                                 f"{i} is {new.proto.pieces[i].piece!r} vs "
                                 f"{base.proto.pieces[i].piece!r}")
    check = sp_pb2.ModelProto()
    check.CopyFrom(base.proto)
    check.normalizer_spec.add_dummy_prefix = False
    sp = spm.SentencePieceProcessor(model_proto=check.SerializeToString())
    texts = []
    for i in new_ids:
        if i >= len(new.proto.pieces):
            raise TokenizerError(f"new id {i} is not a piece of {new_tokenizer}")
        texts.append(new.proto.pieces[i].piece.replace("\u2581", " "))
    splits = sp.encode(texts)
    for i, text, ids in zip(new_ids, texts, splits):
        if not ids:
            raise TokenizerError(f"new token {i} ({text!r}) encodes to nothing with the base "
                                 f"tokenizer")
    return splits


def extended_table(old: torch.Tensor, old_to_new: List[int], new_ids: List[int],
                   splits: List[List[int]], padded_rows: int, norm_correction: bool) -> torch.Tensor:
    """The [padded_rows, H] table: base rows at their new ids, new rows = mean of their base
    split's rows (computed in fp32), zero padding."""
    hidden = old.shape[1]
    out = torch.zeros(padded_rows, hidden, dtype=old.dtype)
    old_ids = torch.arange(len(old_to_new))
    out[torch.tensor(old_to_new)] = old[old_ids]
    base32 = old[: len(old_to_new)].float()
    flat = torch.tensor([t for ids in splits for t in ids])
    offsets = torch.tensor([0] + [len(ids) for ids in splits[:-1]]).cumsum(0)
    rows = torch.nn.functional.embedding_bag(flat, base32, offsets, mode="mean")
    if norm_correction:
        target = base32.norm(dim=1).mean()
        rows = rows * (target / rows.norm(dim=1, keepdim=True).clamp_min(1e-12))
    out[torch.tensor(new_ids)] = rows.to(old.dtype)
    return out


def checkpoint_base_tokenizer(root: str) -> str:
    """The tokenizer a checkpoint was trained with: its ``tokenizer/`` when that holds a
    sentencepiece model, else Phi-3's (checkpoints converted before tokenizers travelled)."""
    own = os.path.join(root, TOKENIZER_SUBDIR)
    return own if os.path.isfile(os.path.join(own, SP_MODEL_FILE)) else shared_path("tokenizers", "phi3")


def extend_vocab(src: str, tokenizer: str, out: str, base_tokenizer: Optional[str] = None,
                 norm_correction: bool = False, name: Optional[str] = None, force: bool = False,
                 progress: bool = True) -> dict:
    """Write checkpoint ``out``: ``src`` with embedding/output rows for the tokenizer
    ``tokenizer`` (a directory written by tools/extend_tokenizer.py). Returns a summary dict."""
    from megatron_jai.checkpoint.stream import CheckpointFormatError, Surgery

    vmap = load_vocab_map(tokenizer)
    old_to_new, new_vocab = [int(i) for i in vmap["old_to_new"]], int(vmap["vocab_size"])
    surgery = Surgery([src])
    reader, base_cfg = surgery.readers[0], surgery.config
    base_tokenizer = base_tokenizer or checkpoint_base_tokenizer(reader.root)
    if len(old_to_new) > base_cfg.vocab_size:
        raise TokenizerError(f"{tokenizer} maps {len(old_to_new)} base ids, but the checkpoint has "
                             f"only {base_cfg.vocab_size} (wrong --tokenizer or checkpoint?)")
    if len(set(old_to_new)) != len(old_to_new) or not all(0 <= i < new_vocab for i in old_to_new):
        raise TokenizerError(f"{tokenizer}: vocab_map.json old_to_new is not a one-to-one map "
                             f"into [0, {new_vocab})")
    base_vocab = load_base_tokenizer(base_tokenizer).vocab_size
    if base_vocab != len(old_to_new):
        raise TokenizerError(f"base tokenizer {base_tokenizer} has {base_vocab} ids, the "
                             f"tokenizer's vocab_map.json maps {len(old_to_new)}")
    kept = set(old_to_new)
    new_ids = [i for i in range(new_vocab) if i not in kept]
    splits = base_splits(base_tokenizer, tokenizer, new_ids)
    cfg = base_cfg.replace(name=name or f"{base_cfg.name}-vocab{new_vocab}", vocab_size=new_vocab)

    if EMBEDDING_KEY not in surgery.others:
        raise CheckpointFormatError(f"checkpoint {src} has no {EMBEDDING_KEY}")
    table_keys = [k for k in (EMBEDDING_KEY, OUTPUT_KEY) if k in surgery.others]
    for key in table_keys:
        if reader.shape(key)[0] != base_cfg.padded_vocab_size:
            raise CheckpointFormatError(f"{key} has {reader.shape(key)[0]} rows, the config's "
                                        f"padded vocabulary is {base_cfg.padded_vocab_size}")

    def table(key):
        if key not in table_keys:
            return reader.read(key)
        return extended_table(reader.read(key), old_to_new, new_ids, splits,
                              cfg.padded_vocab_size, norm_correction)

    def new_tokenizer(writer):  # replaces the input's own (side files never overwrite)
        tok_dir = writer.path(os.path.join(TOKENIZER_SUBDIR, SP_MODEL_FILE))
        shutil.copytree(tokenizer, os.path.dirname(tok_dir), dirs_exist_ok=True)

    t0 = time.time()
    bytes_written = surgery.write(out, cfg, tensor=table, files=new_tokenizer, force=force,
                                  progress=progress, desc="copy layers")
    counts = cfg.parameter_counts()
    return {"out": os.path.abspath(out), "base_vocab": base_cfg.vocab_size, "vocab": new_vocab,
            "padded_vocab": cfg.padded_vocab_size, "new_rows": len(new_ids),
            "mean_split": sum(map(len, splits)) / max(len(splits), 1), "tables": table_keys,
            "config": cfg, "params_total": counts["total"], "bytes": bytes_written,
            "seconds": time.time() - t0}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--in", dest="src", required=True, help="input checkpoint root (ours)")
    p.add_argument("--tokenizer", required=True,
                   help="extended tokenizer directory (tools/extend_tokenizer.py output, "
                        "with vocab_map.json)")
    p.add_argument("--out", required=True, help="output checkpoint root")
    p.add_argument("--base-tokenizer", default=None,
                   help="the tokenizer the input checkpoint was trained with (default: the one it "
                        "carries in tokenizer/, else Phi-3's)")
    p.add_argument("--norm-correction", action="store_true",
                   help="rescale new rows to the mean norm of the base rows")
    p.add_argument("--name", help="model name in the new config (default: <base>-vocab<V>)")
    p.add_argument("--force", action="store_true", help="replace an existing output")


def main(args: argparse.Namespace) -> int:
    s = extend_vocab(args.src, args.tokenizer, args.out, base_tokenizer=args.base_tokenizer,
                     norm_correction=args.norm_correction, name=args.name, force=args.force)
    print(f"vocab: {s['base_vocab']} -> {s['vocab']} ids (padded {s['padded_vocab']}), "
          f"{s['new_rows']} new rows in {', '.join(s['tables'])} = mean of {s['mean_split']:.2f} "
          f"base pieces each{' (norm-corrected)' if args.norm_correction else ''}, wrote {s['out']} "
          f"({s['bytes'] / 2**20:.1f} MiB) in {s['seconds']:.1f}s")
    return 0
