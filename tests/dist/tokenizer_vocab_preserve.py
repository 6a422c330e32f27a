"""torchrun helper (2 processes, TP=2): vocabulary extension preserves the base model's function.

1. A random tiny Phi-3-shaped model (vocab 32,064) is saved at TP=2.
2. Rank 0 runs the ``upscale.py vocab`` subcommand with the extended tokenizer given on the command line.
3. Both checkpoints are loaded at TP=2 (vocab-parallel embedding/output shards cut from the global
   tensors); for English lines whose base and extended encodings coincide, the full-vocabulary
   logits of the extended model equal the base model's on the base ids (fp32, tight tolerance).
   Thai text runs through the extended model with finite logits.

usage: tokenizer_vocab_preserve.py WORK_DIR EXT_TOKENIZER_DIR ENGLISH_TXT THAI_TXT
"""
import argparse
import os
import sys

import torch
import torch.distributed as dist

from megatron_jai import parallel
from megatron_jai.checkpoint.dist import load_checkpoint, save_checkpoint
from megatron_jai.presets import TINY, load_model_config
from megatron_jai.model import build_model
from megatron_jai.paths import shared_path
from megatron_jai.upscale import vocab

SEQ = 48


def full_logits(model, ids):
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    tokens = torch.tensor([ids])
    positions = torch.arange(len(ids)).unsqueeze(0)
    with torch.no_grad():
        logits = model(tokens, positions, None)  # [1, s, V/tp]
        return gather_from_tensor_model_parallel_region(logits)[0]


def main(work: str, ext_tok: str, english: str, thai: str) -> None:
    import sentencepiece as spm

    base_dir, ext_dir = os.path.join(work, "base"), os.path.join(work, "ext")
    cfg = TINY.replace(name="tiny-phi3", vocab_size=32064)
    parallel.initialize(tp=2, pp=1, seed=5)
    base = build_model(cfg, tp=2)
    base.eval()
    save_checkpoint(base_dir, [base], cfg)
    if dist.get_rank() == 0:  # `upscale.py vocab` (its parser and main), without a new interpreter
        parser = argparse.ArgumentParser()
        vocab.add_arguments(parser)
        args = parser.parse_args(["--in", base_dir, "--tokenizer", ext_tok, "--out", ext_dir])
        assert vocab.main(args) == 0
    dist.barrier()

    ext_cfg = load_model_config(ext_dir)
    assert ext_cfg.replace(name=cfg.name, vocab_size=cfg.vocab_size) == cfg, "only the vocab may change"
    assert ext_cfg.padded_vocab_size % 128 == 0 and ext_cfg.padded_vocab_size > cfg.padded_vocab_size
    ext = build_model(ext_cfg, tp=2)
    ext.eval()
    load_checkpoint(ext_dir, [ext])

    sp_base = spm.SentencePieceProcessor(model_file=shared_path("tokenizers", "phi3", "tokenizer.model"))
    sp_ext = spm.SentencePieceProcessor(model_file=os.path.join(ext_tok, "tokenizer.model"))
    n_old = 32011  # the base tokenizer's ids (32,000 pieces + 11 specials); 32011.. were padding
    with open(english) as f:
        lines = [line.strip() for line in f if line.strip()]
    compared = 0
    for line in lines:
        ids = sp_base.encode(line)[:SEQ]
        assert sp_ext.encode(line)[:SEQ] == ids, f"encodings differ on English: {line[:60]!r}"
        a, b = full_logits(base, ids), full_logits(ext, ids)
        assert a.shape[-1] == cfg.padded_vocab_size and b.shape[-1] == ext_cfg.padded_vocab_size
        err = (a[:, :n_old] - b[:, :n_old]).abs().max().item()
        assert err < 1e-5, f"logits on the base vocabulary differ by {err}"
        assert not torch.equal(a[:, n_old:cfg.vocab_size], b[:, n_old:cfg.vocab_size]), \
            "rows of the new pieces should differ from the base padding rows"
        compared += 1
    with open(thai) as f:
        thai_ids = sp_ext.encode(f.read().strip())[:SEQ]
    assert max(thai_ids) >= n_old, "the Thai sample should use new pieces"
    assert torch.isfinite(full_logits(ext, thai_ids)).all()
    print(f"OK rank={dist.get_rank()} lines={compared} vocab {cfg.padded_vocab_size}->"
          f"{ext_cfg.padded_vocab_size}")
    parallel.destroy()


if __name__ == "__main__":
    main(*sys.argv[1:5])
