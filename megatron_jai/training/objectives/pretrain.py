"""Pretraining: next-token cross entropy on indexed text datasets, averaged over the loss-masked
tokens of the global batch, with per-dataset losses of a blend."""
from __future__ import annotations

import os
from typing import Callable, Optional

import torch

from megatron_jai.training.objectives.base import Objective


class PretrainObjective(Objective):
    """Language modelling; SFT keeps the loss and changes the data (:mod:`.sft`)."""

    name = "pretrain"

    # -- data -------------------------------------------------------------------------------
    def default_data(self, log: Optional[Callable]) -> Optional[str]:
        """The project's demo corpus (built once; safe from every rank at once); its tokenizer
        becomes the run's unless one was given."""
        from megatron_jai.data.demo import ensure_demo_data

        demo = ensure_demo_data(self.args.data_cache_dir, log=log)
        self.args.tokenizer = self.args.tokenizer or demo.tokenizer_path
        return demo.data_prefix

    def build_dataset(self, blend, seq_length: int, num_samples: int, seed: int):
        from megatron_jai.data.datasets import build_datasets

        cache = self.args.data_cache_dir
        train, _ = build_datasets(
            list(blend), seq_length, num_samples=num_samples, seed=seed,
            tokenizer=self.args.tokenizer,
            cache_dir=os.path.join(cache, "dataset_index") if cache else None)
        return train

    # -- loss -------------------------------------------------------------------------------
    def stat_names(self, labels: tuple) -> list:
        names = ["loss_sum", "units"]
        if len(labels) > 1:
            names += [f"loss_sum/{lab}" for lab in labels] + [f"units/{lab}" for lab in labels]
        return names

    def loss(self, per_token_loss: torch.Tensor, batch: dict, labels: tuple) -> tuple:
        """The masked tokens' sum, and per dataset of a blend."""
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
        out = super().summarize(sums, labels)
        if len(labels) > 1:
            for lab in labels:
                if sums[f"units/{lab}"] > 0:
                    out[f"loss/{lab}"] = sums[f"loss_sum/{lab}"] / sums[f"units/{lab}"]
        return out
