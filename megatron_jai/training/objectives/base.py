"""The plug-in interface of the one training loop: what a batch holds and what loss it gives.

The loop (:mod:`megatron_jai.training.loop`) is the same for pretraining, SFT and DPO; an
:class:`Objective` plugs in the data (datasets, collation) and the loss. Its loss is a *sum* over
loss units (tokens for language modelling, pairs for DPO) plus statistics; the loop divides by the
number of units in the whole global batch (every micro-batch, every DP rank), counted before the
forward pass, so the loss is the mean over the global batch, never a mean of means.

Statistics are a flat fp32 vector per micro-batch, summed over micro-batches and DP ranks;
``stat_names`` names its entries (the first two are always ``loss_sum`` and ``units``) and
``summarize`` turns the sums into metrics.

An objective sees the run through an :class:`ObjectiveContext` (model, config, arguments, the
data-parallel position, a logger), never through the Trainer.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from megatron_jai.training.faults import TrainingError, poison_loss

BATCH_KEYS = ("tokens", "labels", "loss_mask", "position_ids")


@dataclass
class ObjectiveContext:
    """What an objective may use of a run that is set up (the model built and loaded)."""

    args: argparse.Namespace
    cfg: object  # the run's ModelConfig
    tcfg: object  # Megatron-Core's TransformerConfig of this rank
    model: torch.nn.Module  # this rank's pipeline stage, unwrapped (``.jai_config``)
    ddp_model: torch.nn.Module  # what the schedule runs (Float16Module / DDP wrapped)
    phases: list
    resuming: bool  # --load continues a run (else: --init-from or scratch)
    device: torch.device
    rank: int  # global rank
    dp: int  # data-parallel size and this rank's position in it
    dp_rank: int
    log: Callable[[str], None]  # one line, printed by rank 0


def collate(items: list) -> dict:
    """Stack the items of a micro-batch (every key of :data:`BATCH_KEYS` plus integer ids)."""
    out = {key: torch.stack([torch.as_tensor(item[key]) for item in items]) for key in BATCH_KEYS}
    for key in ("dataset_id", "record_index"):
        if key in items[0]:
            out[key] = torch.tensor([int(item[key]) for item in items])
    if "dataset_id" not in out:
        out["dataset_id"] = torch.zeros(len(items), dtype=torch.long)
    return out


class Objective:
    """An objective's data, loss and hooks. The defaults are those of language modelling on
    Megatron's per-token cross entropy (:mod:`.pretrain`); subclasses give the datasets and the
    loss."""

    name = "objective"
    sequences_per_sample = 1  # DPO: 2 (chosen and rejected share the micro-batch)
    trains = True  # False: the objective's before_training is the whole job
    # DUS skip alphas of validation: "inference" (as the exported model runs; models whose skips
    # train with other alphas also get ..._train_alphas metrics), or "train".
    valid_alphas = "inference"

    def __init__(self, args):
        self.args = args

    # -- data -------------------------------------------------------------------------------
    def check_data(self, cfg, phases) -> None:
        """Rank 0, before the model is built: refuse data that cannot work (one line)."""
        from megatron_jai.training.data_loading import check_validation, check_vocabulary

        check_validation(phases, self.args.eval_interval)
        check_vocabulary(cfg, phases, self.args.tokenizer)

    def default_data(self, log: Optional[Callable]) -> Optional[str]:
        """The data prefix of a run given none (``--data-path`` and phases absent); None: refused."""
        return None

    def build_dataset(self, blend, seq_length: int, num_samples: int, seed: int):
        raise NotImplementedError

    def build_valid_dataset(self, blend, seq_length: int, num_samples: int, seed: int):
        return self.build_dataset(blend, seq_length, num_samples, seed)

    def collate(self, items: list) -> dict:
        return collate(items)

    def prepare_batches(self, ctx: ObjectiveContext, batches: list, run) -> list:
        """The step's (device) micro-batches before the schedule runs, on every rank (e.g. DPO's
        live reference attaches its log-probs); ``run``: the phase's ``seq_length`` (``run.phase``)
        and micro-batch size (``run.mbs``)."""
        return batches

    def units(self, batch: dict) -> int:
        """Loss units in a (host) micro-batch: what the global-batch mean divides by."""
        return int(batch["loss_mask"].sum())

    def validation_modes(self, cfg) -> list:
        """``[(metric suffix, DUS skip alphas)]`` of validation (see :attr:`valid_alphas`)."""
        modes = [("", self.valid_alphas)]
        if self.valid_alphas == "inference" and cfg.skip_connections and \
                any(s.alpha_train != s.alpha_infer for s in cfg.skip_connections):
            modes.append(("_train_alphas", "train"))
        return modes

    # -- loss -------------------------------------------------------------------------------
    def stat_names(self, labels: tuple) -> list:
        return ["loss_sum", "units"]

    def forward(self, model, batch: dict, labels: tuple) -> tuple:
        """Run the model on a (device) micro-batch (packed sequences when it carries
        ``cu_seqlens``). Returns ``(output, loss_terms)`` where ``loss_terms(output) ->
        (loss_sum, stats)`` (:meth:`loss`) on the last pipeline stage."""
        packed = None
        if "cu_seqlens" in batch:
            from megatron.core.packed_seq_params import PackedSeqParams

            cu, top = batch["cu_seqlens"], int(batch["max_seqlen"])
            packed = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                                     max_seqlen_q=top, max_seqlen_kv=top)
        output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"],
                       packed_seq_params=packed)
        return output, lambda out: self.loss(out, batch, labels)

    def loss(self, per_token_loss: torch.Tensor, batch: dict, labels: tuple) -> tuple:
        """``(loss_sum, stats)`` of a micro-batch from Megatron's per-token cross entropy."""
        raise NotImplementedError

    def summarize(self, sums: dict, labels: tuple) -> dict:
        """Metrics of a step from the summed statistics."""
        return {"loss": sums["loss_sum"] / sums["units"] if sums["units"] > 0 else float("nan")}

    # -- hooks ------------------------------------------------------------------------------
    def before_training(self, ctx: ObjectiveContext) -> None:
        """After the model is built and loaded, before the first step (e.g. DPO's reference
        pass)."""

    def describe(self) -> str:
        return self.name


def make_loss_func(loss_terms: Callable, scale, inject_nan: bool) -> Callable:
    """Megatron's ``loss_func`` for a micro-batch: the objective's loss sum scaled so that the
    schedule's division by the micro-batch count and DDP's average over DP give the global-batch
    mean (``scale = micro-batches * DP / global units``, a number or a 0-dim tensor)."""

    def loss_func(output_tensor):
        loss_sum, stats = loss_terms(output_tensor)
        if inject_nan:
            loss_sum, stats = poison_loss(loss_sum, stats)
        # The schedule divides the returned loss in place: return a new tensor, report a clone.
        return loss_sum * scale, {"stats": stats.detach().clone()}

    return loss_func


def sums_by_name(stats: torch.Tensor, names: list) -> dict:
    if stats.numel() != len(names):
        raise TrainingError(f"objective statistics have {stats.numel()} entries, expected "
                            f"{len(names)} ({names})")
    return {name: float(v) for name, v in zip(names, stats.tolist())}
