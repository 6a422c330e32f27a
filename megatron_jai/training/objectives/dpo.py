"""DPO (``posttrain_jai.py dpo``) and its reference pass alone (``dpo-reference``).

Pairs from ``tools/preprocess_chat.py --kind dpo``; chosen and rejected of a pair are rows ``2i`` /
``2i + 1`` of the same micro-batch. The loss of a pair is an entry of :mod:`.dpo_losses`
(``--dpo-loss``, TRL's names and formulas), plus ``--dpo-nll-weight`` x TRL's NLL term, averaged
over the pairs of the global batch. Rewards are ``beta * (pi - ref)`` (of the log-probs the loss
takes); ``margin`` is their difference and ``accuracy`` the fraction of pairs with a positive one.

The reference log-probabilities come from a file beside each dataset (:mod:`.dpo_reference`),
computed first when missing and ``--init-from`` is the reference; ``--reference-mode live`` keeps
a frozen reference model instead.
"""
from __future__ import annotations

import os

import torch

from megatron_jai.training.faults import TrainingError
from megatron_jai.training.objectives import dpo_losses
from megatron_jai.training.objectives.base import Objective, ObjectiveContext, collate
from megatron_jai.training.objectives.dpo_reference import (answer_logps, build_reference_model,
                                                            check_reference_file,
                                                            load_reference_file,
                                                            reference_file, reference_forward,
                                                            reference_identity, reference_pass)
from megatron_jai.training.objectives.sft import ChatData, chat_prefixes

DPO_STATS = ["loss_sum", "units", "rewards_chosen", "rewards_rejected", "margin", "correct",
             "nll"]


def add_dpo_arguments(parser, reference_only: bool = False) -> None:
    g = parser.add_argument_group("DPO")
    g.add_argument("--reference", default=None,
                   help="reference checkpoint (default: --init-from)")
    g.add_argument("--recompute-reference", action="store_true",
                   help="recompute the reference log-probs even when a file exists")
    if reference_only:  # the pass alone: no loss, a stored reference
        parser.set_defaults(reference_mode="precomputed", **dpo_losses.loss_defaults())
        return
    dpo_losses.add_loss_arguments(g)
    g.add_argument("--reference-mode", choices=["precomputed", "live"], default="precomputed",
                   help="precomputed: log-probs stored beside the data (one model in memory); "
                        "live: a frozen reference model computes them every step")


class DPOObjective(ChatData, Objective):
    name = kind = "dpo"
    sequences_per_sample = 2
    valid_alphas = "train"  # the forward the reference log-probs were computed with

    def __init__(self, args):
        super().__init__(args)
        dpo_losses.check_loss_arguments(args)
        self.loss_entry = dpo_losses.LOSSES[args.dpo_loss]
        self.hyperparameters = dpo_losses.loss_values(args, self.loss_entry)
        self.reference_logps: dict = {}  # prefix -> {"logps": [N, 2], "lengths": [N, 2]}
        self.reference_model = None
        self.reference_root = None

    def describe(self) -> str:
        a = self.args
        return (f"dpo ({a.dpo_loss}, beta {a.dpo_beta:g}"
                + (f", label smoothing {a.dpo_label_smoothing:g}" if a.dpo_label_smoothing
                   else "")
                + (f", nll weight {a.dpo_nll_weight:g}" if a.dpo_nll_weight else "")
                + f", {a.reference_mode} reference)")

    # -- data -------------------------------------------------------------------------------
    def build_dataset(self, blend, seq_length: int, num_samples: int, seed: int):
        return self._with_reference(super().build_dataset(blend, seq_length, num_samples, seed),
                                    blend)

    def build_valid_dataset(self, blend, seq_length: int, num_samples: int, seed: int):
        return self._with_reference(
            super().build_valid_dataset(blend, seq_length, num_samples, seed), blend)

    def _with_reference(self, dataset, blend):
        if self.reference_model is not None:  # live: computed per step (prepare_batches)
            return dataset
        return _WithReference(dataset, [self.reference_logps[prefix] for _, prefix in blend])

    def collate(self, items: list) -> dict:
        batch = collate(items)  # [B, 2, S] -> rows 2i (chosen), 2i + 1 (rejected)
        for key in ("tokens", "labels", "loss_mask", "position_ids"):
            batch[key] = batch[key].reshape(-1, batch[key].shape[-1])
        if "ref_logps" in items[0]:
            for key in ("ref_logps", "ref_lengths"):
                batch[key] = torch.stack([item[key] for item in items])
        return batch

    def units(self, batch: dict) -> int:
        return int(batch["tokens"].shape[0]) // 2

    def prepare_batches(self, ctx: ObjectiveContext, batches: list, run) -> list:
        """The live reference's log-probs (precomputed ones come with the samples:
        :class:`_WithReference`), and the NLL term's global count of chosen-answer tokens."""
        if self.reference_model is not None:
            refs = reference_forward(ctx, self.reference_model, batches, run)
            for batch, (logps, lengths) in zip(batches, refs):
                batch["ref_logps"], batch["ref_lengths"] = logps, lengths
        if self.args.dpo_nll_weight:
            # TRL's NLL term is a mean over the chosen tokens: the loop's mean is over pairs.
            import torch.distributed as dist
            from megatron.core import parallel_state as ps

            tokens = sum(b["loss_mask"][0::2].sum() for b in batches).float()
            pairs = sum(b["tokens"].shape[0] // 2 for b in batches)
            counts = torch.stack([tokens, torch.tensor(float(pairs), device=tokens.device)])
            dist.all_reduce(counts, group=ps.get_data_parallel_group())
            for batch in batches:
                batch["pairs_per_chosen_token"] = counts[1] / counts[0].clamp(min=1.0)
        return batches

    # -- loss -------------------------------------------------------------------------------
    def stat_names(self, labels: tuple) -> list:
        return list(DPO_STATS)

    def loss(self, per_token_loss: torch.Tensor, batch: dict, labels: tuple) -> tuple:
        logp, lengths = answer_logps(per_token_loss, batch["loss_mask"])
        ref = batch["ref_logps"].to(logp.dtype)
        pc, pr, rc, rr = logp[0::2], logp[1::2], ref[:, 0], ref[:, 1]
        if self.loss_entry.length_normalised:
            pc, rc = pc / lengths[0::2].clamp(min=1), rc / lengths[0::2].clamp(min=1)
            pr, rr = pr / lengths[1::2].clamp(min=1), rr / lengths[1::2].clamp(min=1)
        losses, chosen, rejected = dpo_losses.dpo_loss(
            pc, pr, rc, rr, loss_type=self.loss_entry.name, **self.hyperparameters)
        nll = -logp[0::2] / lengths[0::2].clamp(min=1)
        if self.args.dpo_nll_weight:
            losses = losses - self.args.dpo_nll_weight * logp[0::2] \
                * batch["pairs_per_chosen_token"]
        loss_sum = losses.sum()
        margin = chosen - rejected
        stats = torch.stack([loss_sum.detach(), torch.tensor(float(len(losses)),
                                                            device=loss_sum.device),
                             chosen.sum(), rejected.sum(), margin.sum(),
                             (margin > 0).float().sum(), nll.detach().sum()])
        return loss_sum, stats

    def summarize(self, sums: dict, labels: tuple) -> dict:
        n = sums["units"]
        if n <= 0:
            return {"loss": float("nan")}
        return {"loss": sums["loss_sum"] / n, "rewards/chosen": sums["rewards_chosen"] / n,
                "rewards/rejected": sums["rewards_rejected"] / n, "margin": sums["margin"] / n,
                "accuracy": sums["correct"] / n, "nll/chosen": sums["nll"] / n}

    # -- the reference ---------------------------------------------------------------------
    def before_training(self, ctx: ObjectiveContext) -> None:
        a = self.args
        reference = a.reference or a.init_from
        if reference is None:
            raise TrainingError("DPO needs a reference model: --init-from the SFT checkpoint (it "
                                "is the reference too) or --reference CKPT")
        self.reference_root = reference  # (read by tools/bench_posttrain.py)
        if a.reference_mode == "live":
            self.reference_model = build_reference_model(ctx, reference)
            ctx.log(f"reference model: {reference} (live, frozen)")
            return
        identity = reference_identity(reference)
        can_compute = (not ctx.resuming and a.init_from is not None
                       and os.path.realpath(a.init_from) == os.path.realpath(reference))
        todo = []
        for prefix in chat_prefixes(ctx.phases):
            path = reference_file(prefix, identity)
            if os.path.isfile(path) and not a.recompute_reference:
                error = check_reference_file(path, prefix, identity)
                if error:
                    raise TrainingError(f"{error}; pass --recompute-reference to replace it")
                continue
            if not can_compute:
                raise TrainingError(f"no reference log-probs of {prefix} for reference "
                                    f"{reference} ({path}); compute them first with: "
                                    f"posttrain_jai.py dpo-reference --reference {reference} "
                                    f"--data-path {prefix}")
            todo.append(prefix)
        seq = max(p.seq_length for p in ctx.phases)
        for prefix in todo:
            reference_pass(ctx, prefix, seq, identity, self.collate)
        for prefix in chat_prefixes(ctx.phases):
            self.reference_logps[prefix] = load_reference_file(reference_file(prefix, identity))


class _WithReference(torch.utils.data.Dataset):
    """DPO samples with their pair's stored reference log-probs (looked up by the sample's
    ``dataset_id`` and ``record_index``, in the loader, not on the training step's path)."""

    def __init__(self, dataset, references: list):
        self.dataset, self.references = dataset, references

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        item = self.dataset[i]
        ref = self.references[int(item["dataset_id"])]
        row = int(item["record_index"])
        item["ref_logps"] = torch.from_numpy(ref["logps"][row])
        item["ref_lengths"] = torch.from_numpy(ref["lengths"][row])
        return item


class DPOReferenceOnly(DPOObjective):
    """``posttrain_jai.py dpo-reference``: the reference pass over every dataset, no training."""

    name = "dpo-reference"
    trains = False

    def describe(self) -> str:
        return "dpo-reference (forward only)"
