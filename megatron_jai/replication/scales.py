"""The sizes of a replication run (``--scale smoke|small``) and what follows from them: the base
model's configuration, the DUS plan scaled to its depth, the phases, the token budgets.

The base model is Phi-3-shaped (RMSNorm, SwiGLU FFN of 3.5x the width, grouped-query attention with
a quarter of the heads as key/value heads, RoPE base 10,000, untied embeddings) and 10 layers deep,
so JAI-1's Solar-Pro layout (Phi-3-medium's 40 layers in 10 blocks of 4, block multiplicities
``1 1 1 2 3 3 2 1 1 1`` -> 64 layers) becomes 10 blocks of 1 layer -> 16 layers, with the same
skips (the inputs of each repeated block's first copy blended into its later copies), alpha 0.9 in
training and 0.8 at inference.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Tuple

# JAI-1 (Solar-Pro's public layout): block multiplicities of Phi-3-medium's 10 blocks.
JAI_MULTIPLICITIES = (1, 1, 1, 2, 3, 3, 2, 1, 1, 1)
ALPHA_TRAIN, ALPHA_INFER = 0.9, 0.8
BASE_ROPE = 10_000.0
LONG_FACTOR = 4  # context extension: 4x the sequence length


@dataclass(frozen=True)
class Scale:
    name: str
    # ---- data (first documents / records of the shared training files) ----
    english_docs: int  # enwiki train documents (base pretraining and every phase)
    thai_docs: int  # thaigov train documents (Thai BPE and phases 2-3)
    sft_records: int  # per SFT source file
    dpo_pairs: int  # DPO training pairs per language (at most: the Thai file has 115)
    # ---- tokenizers ----
    base_vocab: int  # pieces of the English base BPE (+ Phi-3's 11 special tokens)
    thai_vocab: int  # pieces of the Thai BPE
    target_vocab: int  # ids of the extended tokenizer (about twice the base's)
    # ---- the base model ----
    hidden: int
    heads: int
    seq: int  # the short context; phase 3 trains at LONG_FACTOR x seq
    batch: int  # sequences of `seq` tokens per step (phase 3: batch / LONG_FACTOR of 4x seq)
    base_steps: int
    base_lr: float
    # ---- continued pretraining: steps of the three phases, the same for JAI and the controls ----
    phase_steps: Tuple[int, int, int]  # english recovery, Thai injection, context extension
    lr: float
    curve_points: int  # checkpoints evaluated per phase for the bits/char curves
    # ---- post-training ----
    sft_steps: int
    sft_batch: int
    sft_lr: float
    dpo_steps: int
    dpo_batch: int  # pairs per step
    dpo_lr: float
    # ---- evaluation (first documents / items of each set) ----
    thai_eval_docs: int  # validation documents, each cut to eval_chars characters
    english_eval_docs: int
    eval_chars: int
    ntrex_lines: int
    iapp_items: int  # first records of the iApp QA validation split (evaluation only)
    long_docs: int  # documents longer than the short context, per language
    dpo_heldout_pairs: int  # held-out pairs per language (at most: the Thai file has 12)
    seeds: int  # seeds of the pretraining arms (JAI and both controls)
    layers: int = 10
    min_lr_ratio: float = 0.1

    def __post_init__(self):
        if self.phase_steps[0] % 3:  # the snapshots at 1/3, 2/3 and the end are saves
            raise ValueError(f"scale {self.name}: phase 1 steps must be a multiple of 3")
        if self.batch % LONG_FACTOR:
            raise ValueError(f"scale {self.name}: the batch must be a multiple of {LONG_FACTOR}")

    @property
    def phase_tokens(self) -> Tuple[int, int, int]:
        return tuple(s * self.batch * self.seq for s in self.phase_steps)

    @property
    def long_seq(self) -> int:
        return LONG_FACTOR * self.seq

    @property
    def dpo_seq(self) -> int:
        """DPO pairs are padded to this (the preference data is short: less padding)."""
        return 3 * self.seq

    @property
    def long_rotary_base(self) -> float:
        """NTK-aware RoPE base for LONG_FACTOR x the context (base * s^(d / (d - 2)))."""
        d = self.hidden // self.heads
        return float(round(BASE_ROPE * LONG_FACTOR ** (d / (d - 2)), -3))

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


SMOKE = Scale(
    name="smoke", english_docs=40, thai_docs=300, sft_records=40, dpo_pairs=16,
    base_vocab=1000, thai_vocab=2000, target_vocab=2000,
    hidden=32, heads=4, seq=64, batch=8, base_steps=12, base_lr=3e-3,
    phase_steps=(6, 4, 4), lr=1e-3, curve_points=1,
    sft_steps=3, sft_batch=4, sft_lr=1e-3, dpo_steps=3, dpo_batch=2, dpo_lr=1e-4,
    thai_eval_docs=2, english_eval_docs=2, eval_chars=1000, ntrex_lines=20, iapp_items=3, long_docs=2,
    dpo_heldout_pairs=8, seeds=2,
)

SMALL = Scale(
    name="small", english_docs=600, thai_docs=2000, sft_records=1000, dpo_pairs=160,
    base_vocab=8000, thai_vocab=12000, target_vocab=16000,
    hidden=64, heads=4, seq=128, batch=16, base_steps=360, base_lr=3e-3,
    phase_steps=(135, 135, 33), lr=1.5e-3, curve_points=2,
    sft_steps=40, sft_batch=8, sft_lr=5e-4, dpo_steps=20, dpo_batch=8, dpo_lr=1e-4,
    thai_eval_docs=30, english_eval_docs=15, eval_chars=1500, ntrex_lines=200, iapp_items=30,
    long_docs=10, dpo_heldout_pairs=60, seeds=2,
)

SCALES = {s.name: s for s in (SMOKE, SMALL)}


def base_model_config(scale: Scale, vocab_size: int) -> dict:
    """The base model's ``model_config.json`` (a Phi-3-shaped dense model, ``scale.layers`` deep)."""
    ffn = int(math.ceil(3.5 * scale.hidden / 16) * 16)
    return {"name": f"replication-{scale.name}-base", "num_layers": scale.layers,
            "hidden_size": scale.hidden, "num_attention_heads": scale.heads,
            "num_query_groups": max(1, scale.heads // 4), "ffn_hidden_size": ffn,
            "vocab_size": vocab_size, "max_position_embeddings": scale.seq,
            "rotary_base": BASE_ROPE}


def dus_plan(scale: Scale) -> dict:
    """JAI-1's block layout on a base of ``scale.layers`` layers (10 blocks), skips derived from the
    repeated blocks (``skips: repeat``)."""
    if scale.layers % len(JAI_MULTIPLICITIES):
        raise ValueError(f"the JAI layout needs a depth divisible by {len(JAI_MULTIPLICITIES)}")
    return {"name": f"jai-{scale.layers}to{scale.layers * sum(JAI_MULTIPLICITIES) // 10}",
            "block_size": scale.layers // len(JAI_MULTIPLICITIES),
            "multiplicities": list(JAI_MULTIPLICITIES), "skips": "repeat",
            "alpha_train": ALPHA_TRAIN, "alpha_infer": ALPHA_INFER}


PHASES = ("english-recovery", "thai-injection", "context-extension")
THAI_SHARE = 0.27


def phases(scale: Scale, which=PHASES) -> list:
    """The ``phases:`` of a run config (datasets ``english`` and ``thai`` of its ``data:``): the
    three phases of the ``jai`` plan (docs/training.md) at this scale. Every step holds
    ``batch x seq`` tokens (phase 3: a quarter of the sequences, four times as long)."""
    out = []
    for name, steps in zip(PHASES, scale.phase_steps):
        if name not in which:
            continue
        phase = {"name": name, "seq_length": scale.seq, "train_iters": steps,
                 "warmup_iters": max(1, steps // 20),
                 "blend": {"english": 1.0} if name == PHASES[0] else
                 {"english": 1 - THAI_SHARE, "thai": THAI_SHARE}}
        if name == PHASES[2]:  # as the jai plan: a new RoPE base, half the peak LR
            phase.update(seq_length=scale.long_seq, rotary_base=scale.long_rotary_base,
                         lr_scale=0.5, global_batch_size=scale.batch // LONG_FACTOR,
                         micro_batch_size=scale.batch // LONG_FACTOR)
        out.append(phase)
    return out
