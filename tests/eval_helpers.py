"""Tiny models for the generation and evaluation tests: a 300-token byte-level BPE tokenizer (trained
on slices of shared/ training text, never on evaluation data), random Megatron checkpoints that
carry it (dense, and JAI-shaped: DUS skips + experts), and their Hugging Face export."""
from __future__ import annotations

import gzip
import json
import os
import shutil

import torch

from megatron_jai.config import SkipConnection
from megatron_jai.presets import TINY

SPECIALS = ["<|endoftext|>", "<s>", "<|user|>", "<|assistant|>", "<|end|>"]
# Weights large enough that greedy decoding has no near-ties between the two implementations.
DENSE = TINY.replace(name="tiny-eval", vocab_size=300, max_position_embeddings=1024,
                     init_method_std=0.1)
JAI = DENSE.replace(name="tiny-eval-jai", num_experts=4, moe_top_k=2, ffn_hidden_size=96,
                    skip_connections=(SkipConnection(0, 2, 0.9, 0.7), SkipConnection(1, 3, 0.9, 0.6)))


def make_tokenizer(shared_dir: str, out: str) -> str:
    """A Hugging Face fast tokenizer (tokenizer.json + tokenizer_config.json with Phi-3's chat
    template) that both ``megatron_jai.data.tokenizer`` and ``AutoTokenizer`` load."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from megatron_jai.data.hf_tokenizer import PHI3_CHAT_TEMPLATE

    texts = []
    for rel, n in (("data/thai/thaigov_v2.train.jsonl.gz", 40), ("data/english/enwiki.train.jsonl.gz", 10)):
        with gzip.open(os.path.join(shared_dir, rel), "rt", encoding="utf-8") as f:
            for i, line in enumerate(f):
                if i >= n:
                    break
                texts.append(json.loads(line)["text"][:3000])
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=DENSE.vocab_size, special_tokens=SPECIALS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    os.makedirs(out, exist_ok=True)
    tok.save(os.path.join(out, "tokenizer.json"))
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>",
                   "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
                   "model_max_length": DENSE.max_position_embeddings,
                   "chat_template": PHI3_CHAT_TEMPLATE}, f)
    return out


def make_checkpoint(root: str, cfg, tokenizer_dir: str, seed: int = 0, uniform: bool = False) -> str:
    """A random model saved as our checkpoint with its tokenizer in ``root/tokenizer``; ``uniform``
    zeroes the output layer (every next token has probability 1/V). Needs model parallel state."""
    from megatron_jai.checkpoint.dist import TOKENIZER_SUBDIR, save_checkpoint
    from megatron_jai.model import build_model

    torch.manual_seed(seed)
    model = build_model(cfg)
    if uniform:
        with torch.no_grad():
            model.output_layer.weight.zero_()
    save_checkpoint(root, [model], cfg, iteration=3)
    shutil.copytree(tokenizer_dir, os.path.join(root, TOKENIZER_SUBDIR))
    return root


def export_hf(ckpt: str, out: str, tokenizer_dir: str) -> str:
    """``mcore-to-hf`` of ``ckpt``; the tokenizer files are copied in when the export has none."""
    from megatron_jai.hf.export import mcore_to_hf

    mcore_to_hf(ckpt, out, progress=False)
    for name in os.listdir(tokenizer_dir):
        if not os.path.exists(os.path.join(out, name)):
            shutil.copy(os.path.join(tokenizer_dir, name), out)
    return out


def tool_main(name: str):
    """``main`` of ``tools/<name>.py``, for in-process calls through ``megatron_jai.cli.run``."""
    import importlib.util

    from conftest import REPO_ROOT

    spec = importlib.util.spec_from_file_location(f"{name}_tool", os.path.join(REPO_ROOT, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def run_tool(name: str, *args) -> int:
    """Exit status of ``tools/<name>.py args`` run in this process (as its ``__main__`` does)."""
    from megatron_jai import cli
    from megatron_jai.inference.lm import USER_ERRORS

    return cli.run(f"{name}.py", tool_main(name), [str(a) for a in args], user_errors=USER_ERRORS)
