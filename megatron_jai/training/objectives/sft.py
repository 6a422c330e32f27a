"""Chat SFT (``posttrain_jai.py sft``), and the chat data that SFT and DPO share.

Chat data from ``tools/preprocess_chat.py --kind sft``: right-padded conversations whose loss mask
covers the assistant turns. The loss is the language-modelling loss of pretraining: the mean over
the assistant tokens of the whole global batch (the loop weights by tokens across micro-batches
and DP ranks). Packing several conversations into one sequence needs Transformer Engine on GPU
(THD attention keeps them apart); elsewhere it is refused.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from megatron_jai.training.faults import TrainingError
from megatron_jai.training.objectives.base import collate
from megatron_jai.training.objectives.pretrain import PretrainObjective


def add_sft_arguments(parser) -> None:
    g = parser.add_argument_group("SFT")
    g.add_argument("--pack-sequences", action="store_true",
                   help="pack several conversations into one sequence (needs Transformer Engine "
                        "on GPU and --micro-batch-size 1; refused elsewhere)")


def chat_prefixes(phases) -> list:
    """Every dataset prefix of the phases' training and validation blends, once, in order."""
    prefixes = []
    for phase in phases:
        for _, prefix in tuple(phase.blend) + tuple(phase.valid_blend):
            if prefix not in prefixes:
                prefixes.append(prefix)
    return prefixes


class ChatData:
    """The data side of SFT and DPO (a mixin before an objective): chat datasets of one kind."""

    kind = "sft"

    def check_data(self, cfg, phases) -> None:
        from megatron_jai.data.chat import read_chat_meta

        for prefix in chat_prefixes(phases):
            try:
                read_chat_meta(prefix, self.kind)
            except ValueError as err:
                raise TrainingError(str(err)) from None
        super().check_data(cfg, phases)

    def default_data(self, log: Optional[Callable]) -> Optional[str]:
        return None  # chat data is always given

    def build_dataset(self, blend, seq_length: int, num_samples: int, seed: int):
        from megatron_jai.data.chat import build_chat_dataset

        return build_chat_dataset(self.kind, list(blend), seq_length, num_samples=num_samples,
                                  seed=seed, pack=getattr(self.args, "pack_sequences", False))

    def build_valid_dataset(self, blend, seq_length: int, num_samples: int, seed: int):
        """Every held-out record once, in order (the first ``--eval-iters`` global batches)."""
        from megatron_jai.data.chat import build_chat_dataset

        return build_chat_dataset(self.kind, list(blend), seq_length, num_samples=None, seed=seed)


class SFTObjective(ChatData, PretrainObjective):
    name = kind = "sft"

    def check_data(self, cfg, phases) -> None:
        if self.args.pack_sequences:
            check_packing(self.args)
        super().check_data(cfg, phases)

    def collate(self, items: list) -> dict:
        batch = collate(items)
        if "cu_seqlens" in items[0]:  # packed (micro-batch size 1)
            batch["cu_seqlens"] = torch.as_tensor(items[0]["cu_seqlens"], dtype=torch.int32)
            batch["max_seqlen"] = torch.tensor(int(items[0]["max_seqlen"]))
        return batch


def check_packing(args) -> None:
    """Packed sequences keep conversations apart only through Transformer Engine's THD attention."""
    if not torch.cuda.is_available():
        raise TrainingError("--pack-sequences needs a GPU with Transformer Engine (THD attention "
                            "keeps packed conversations apart); on CPU sequences are padded")
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        raise TrainingError("--pack-sequences needs Transformer Engine (THD attention keeps "
                            "packed conversations apart): install it, or drop the flag (sequences "
                            "are then padded)") from None
    if args.micro_batch_size != 1:
        raise TrainingError("--pack-sequences packs into one sequence per micro-batch: use "
                            "--micro-batch-size 1")
