"""The output layer without Megatron's vocabulary padding.

Megatron pads the output layer to ``padded_vocab_size`` rows (a multiple of 128); the rows at or
above the model's ``vocab_size`` mean nothing, and the Hugging Face export drops them. Their logits
are set to the lowest finite value of the logits' dtype right where the layer makes them, so every
softmax downstream (the training cross entropy at any TP, the SFT and DPO losses, the DPO reference
pass, generation and evaluation) normalises over the real vocabulary only, as the export does, and
the padding rows get no gradient. A finite floor rather than ``-inf``: a TP shard made only of
padding keeps a finite maximum, which fused cross entropies combine across shards.
"""
from __future__ import annotations

import torch
from megatron.core.tensor_parallel import ColumnParallelLinear
from megatron.core.utils import get_pg_rank


def mask_vocab_padding(logits: torch.Tensor, vocab_size: int, first_id: int = 0) -> torch.Tensor:
    """``logits`` (``[..., V]``, the ids ``first_id ..``) with the ids ``>= vocab_size`` floored, in
    place: only the padding columns are written (no copy of the logits)."""
    start = max(vocab_size - first_id, 0)
    if start < logits.shape[-1]:
        logits[..., start:] = torch.finfo(logits.dtype).min
    return logits


class VocabMaskedOutputLayer(ColumnParallelLinear):
    """Megatron-Core's output layer whose logits of padding ids are masked (module docstring);
    same parameters and checkpoint keys."""

    vocab_size: int

    @classmethod
    def convert(cls, layer: ColumnParallelLinear, vocab_size: int) -> "VocabMaskedOutputLayer":
        """Turn the output layer ``GPTModel`` built into this class, in place."""
        layer.__class__ = cls
        layer.vocab_size = vocab_size
        return layer

    def forward(self, input_, weight=None, runtime_gather_output=None):
        logits, bias = super().forward(input_, weight=weight,
                                       runtime_gather_output=runtime_gather_output)
        gathered = logits.shape[-1] == self.output_size
        first_id = 0 if gathered else get_pg_rank(self.tp_group) * logits.shape[-1]
        return mask_vocab_padding(logits, self.vocab_size, first_id), bias
