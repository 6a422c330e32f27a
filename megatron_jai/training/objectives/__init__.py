"""Training objectives, the plug-ins of the one loop: :mod:`.base` (the interface, the context an
objective sees), :mod:`.pretrain`, :mod:`.sft`, :mod:`.dpo` with its losses (:mod:`.dpo_losses`)
and its reference pass (:mod:`.dpo_reference`)."""
from megatron_jai.training.objectives.base import (BATCH_KEYS, Objective, ObjectiveContext,
                                                   collate, make_loss_func, sums_by_name)

__all__ = ["BATCH_KEYS", "Objective", "ObjectiveContext", "collate", "make_loss_func",
           "sums_by_name"]
