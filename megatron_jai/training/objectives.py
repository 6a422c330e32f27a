"""Training objectives: what a batch holds and what loss it gives.

The loop (:mod:`megatron_jai.training.loop`) is the same for pretraining, SFT and DPO; an
:class:`Objective` plugs in the data (datasets, collation) and the loss. Its loss is a *sum* over
loss units (tokens for language modelling, pairs for DPO) plus statistics; the loop divides by the
number of units in the whole global batch (every micro-batch, every DP rank), counted before the
forward pass, so the loss is the mean over the global batch, never a mean of means.

Statistics are a flat fp32 vector per micro-batch, summed over micro-batches and DP ranks;
``stat_names`` names its entries (the first two are always ``loss_sum`` and ``units``) and
``summarize`` turns the sums into metrics.
"""
from __future__ import annotations

import os
from typing import Callable, Optional

import torch

from megatron_jai.training.faults import TrainingError

BATCH_KEYS = ("tokens", "labels", "loss_mask", "position_ids")


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
    """The pretraining objective: next-token cross entropy, averaged over the loss-masked tokens
    of the global batch. Subclasses change the data (SFT) or the loss (DPO)."""

    name = "pretrain"
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

    def build_dataset(self, blend, seq_length: int, num_samples: int, seed: int):
        from megatron_jai.data.datasets import build_datasets

        cache = self.args.data_cache_dir
        train, _ = build_datasets(
            list(blend), seq_length, num_samples=num_samples, seed=seed,
            tokenizer=self.args.tokenizer,
            cache_dir=os.path.join(cache, "dataset_index") if cache else None)
        return train

    def build_valid_dataset(self, blend, seq_length: int, num_samples: int, seed: int):
        return self.build_dataset(blend, seq_length, num_samples, seed)

    def collate(self, items: list) -> dict:
        return collate(items)

    def prepare_batches(self, trainer, batches: list, run) -> list:
        """The step's (device) micro-batches before the schedule runs (e.g. DPO's live reference
        attaches its log-probs)."""
        return batches

    def units(self, batch: dict) -> int:
        """Loss units in a (host) micro-batch: what the global-batch mean divides by."""
        return int(batch["loss_mask"].sum())

    # -- loss -------------------------------------------------------------------------------
    def stat_names(self, labels: tuple) -> list:
        names = ["loss_sum", "units"]
        if len(labels) > 1:
            names += [f"loss_sum/{lab}" for lab in labels] + [f"units/{lab}" for lab in labels]
        return names

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
        """``(loss_sum, stats)`` of a micro-batch from Megatron's per-token cross entropy:
        the masked tokens' sum, and per dataset of a blend."""
        n_datasets = len(labels)
        mask = batch["loss_mask"].float()
        per_sample = (per_token_loss.float() * mask).sum(dim=1)
        loss_sum = per_sample.sum()
        stats = [loss_sum.detach().reshape(1), mask.sum().reshape(1)]
        if n_datasets > 1:
            ids = batch["dataset_id"]
            per_ds = torch.zeros(2 * n_datasets, device=loss_sum.device)
            per_ds[:n_datasets].index_add_(0, ids, per_sample.detach())
            per_ds[n_datasets:].index_add_(0, ids, mask.sum(dim=1))
            stats.append(per_ds)
        return loss_sum, torch.cat(stats)

    def summarize(self, sums: dict, labels: tuple) -> dict:
        """Metrics of a step from the summed statistics."""
        out = {"loss": sums["loss_sum"] / sums["units"] if sums["units"] > 0 else float("nan")}
        if len(labels) > 1:
            for lab in labels:
                if sums[f"units/{lab}"] > 0:
                    out[f"loss/{lab}"] = sums[f"loss_sum/{lab}"] / sums[f"units/{lab}"]
        return out

    # -- hooks ------------------------------------------------------------------------------
    def before_training(self, trainer) -> None:
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
            loss_sum = loss_sum * float("nan")
            stats = stats.clone()
            stats[0] = loss_sum.detach()
        # The schedule divides the returned loss in place: return a new tensor, report a clone.
        return loss_sum * scale, {"stats": stats.detach().clone()}

    return loss_func


def sums_by_name(stats: torch.Tensor, names: list) -> dict:
    if stats.numel() != len(names):
        raise TrainingError(f"objective statistics have {stats.numel()} entries, expected "
                            f"{len(names)} ({names})")
    return {name: float(v) for name, v in zip(names, stats.tolist())}
