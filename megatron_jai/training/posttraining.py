"""Post-training objectives for the one training loop: chat SFT and DPO (``posttrain_jai.py``).

SFT (:class:`SFTObjective`)
  Chat data from ``tools/preprocess_chat.py --kind sft``: right-padded conversations whose loss
  mask covers the assistant turns. The loss is the language-modelling loss of pretraining: the
  mean over the assistant tokens of the whole global batch (the loop weights by tokens across
  micro-batches and DP ranks). Packing several conversations into one sequence needs Transformer
  Engine on GPU (THD attention keeps them apart); elsewhere it is refused.

DPO (:class:`DPOObjective`)
  Pairs from ``tools/preprocess_chat.py --kind dpo``; chosen and rejected of a pair are rows
  ``2i`` / ``2i + 1`` of the same micro-batch. With ``pi`` / ``ref`` the summed log-probabilities of
  an answer under the policy / the reference and ``h = (pi_c - ref_c) - (pi_r - ref_r)``:

  * ``sigmoid`` (default): ``-log sigmoid(beta * h)``;
  * ``ipo``: ``(h - 1 / (2 beta))^2`` on length-normalised log-probabilities (TRL's convention);
  * optional ``--dpo-nll-weight w``: ``+ w * (mean token NLL of the chosen answer)`` per pair;

  averaged over the pairs of the global batch. Rewards are ``beta * (pi - ref)``; ``margin`` is
  their difference and ``accuracy`` the fraction of pairs with a positive one.

  The reference log-probabilities are computed once, forward only, by a pass over the data with
  the reference model (:func:`reference_pass`) and stored beside each dataset
  (``PREFIX.dpo_ref.<tag>.npz``, the tag naming the reference checkpoint and iteration), so training
  holds one model. The file records the dataset's fingerprint and the reference checkpoint's
  identity; a mismatch (other data, a re-saved checkpoint) is refused. Without a file,
  ``dpo --init-from CKPT`` runs the pass itself first (the reference is the ``--init-from`` model).
  ``--reference-mode live`` keeps a frozen reference model instead.

  The reference runs the same forward as the policy's training step (train-mode DUS skip alphas,
  no gradients), so with policy = reference the first loss is exactly ``log 2``.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from typing import Optional

import numpy
import torch
import torch.nn.functional as F

from megatron_jai.training.faults import TrainingError
from megatron_jai.training.objectives import Objective, collate

REF_FORMAT = 1


# ---- arguments ---------------------------------------------------------------------------------
def add_sft_arguments(parser) -> None:
    g = parser.add_argument_group("SFT")
    g.add_argument("--pack-sequences", action="store_true",
                   help="pack several conversations into one sequence (needs Transformer Engine "
                        "on GPU and --micro-batch-size 1; refused elsewhere)")


def add_dpo_arguments(parser, reference_only: bool = False) -> None:
    g = parser.add_argument_group("DPO")
    g.add_argument("--reference", default=None,
                   help="reference checkpoint (default: --init-from)")
    g.add_argument("--recompute-reference", action="store_true",
                   help="recompute the reference log-probs even when a file exists")
    if reference_only:
        return
    g.add_argument("--dpo-beta", type=float, default=0.1, help="beta of the DPO / IPO loss")
    g.add_argument("--dpo-loss", choices=["sigmoid", "ipo"], default="sigmoid")
    g.add_argument("--dpo-nll-weight", type=float, default=0.0,
                   help="weight of an NLL term on the chosen answer (0 = off)")
    g.add_argument("--reference-mode", choices=["precomputed", "live"], default="precomputed",
                   help="precomputed: log-probs stored beside the data (one model in memory); "
                        "live: a frozen reference model computes them every step")


# ---- SFT ---------------------------------------------------------------------------------------
def _chat_blends(phases) -> list:
    prefixes = []
    for phase in phases:
        for _, prefix in tuple(phase.blend) + tuple(phase.valid_blend):
            if prefix not in prefixes:
                prefixes.append(prefix)
    return prefixes


class ChatObjective(Objective):
    """What SFT and DPO share: chat datasets of one kind."""

    kind = "sft"

    def check_data(self, cfg, phases) -> None:
        from megatron_jai.data.chat import read_chat_meta

        for prefix in _chat_blends(phases):
            try:
                read_chat_meta(prefix, self.kind)
            except ValueError as err:
                raise TrainingError(str(err)) from None
        super().check_data(cfg, phases)

    def build_dataset(self, blend, seq_length: int, num_samples: int, seed: int):
        from megatron_jai.data.chat import build_chat_dataset

        return build_chat_dataset(self.kind, list(blend), seq_length, num_samples=num_samples,
                                  seed=seed, pack=getattr(self.args, "pack_sequences", False))

    def build_valid_dataset(self, blend, seq_length: int, num_samples: int, seed: int):
        """Every held-out record once, in order (the first ``--eval-iters`` global batches)."""
        from megatron_jai.data.chat import build_chat_dataset

        return build_chat_dataset(self.kind, list(blend), seq_length, num_samples=None, seed=seed)


class SFTObjective(ChatObjective):
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


# ---- DPO loss ----------------------------------------------------------------------------------
def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
             ref_chosen: torch.Tensor, ref_rejected: torch.Tensor, beta: float,
             loss_type: str = "sigmoid") -> tuple:
    """Per-pair DPO losses and the (detached) chosen / rejected rewards. Inputs are per-pair
    log-probabilities (summed over the answer, or length-normalised for IPO)."""
    h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * h)
    elif loss_type == "ipo":
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss {loss_type!r}")
    chosen_rewards = beta * (policy_chosen - ref_chosen).detach()
    rejected_rewards = beta * (policy_rejected - ref_rejected).detach()
    return losses, chosen_rewards, rejected_rewards


def answer_logps(per_token_loss: torch.Tensor, loss_mask: torch.Tensor) -> tuple:
    """``(log-prob sums [2B], answer lengths [2B])`` from Megatron's per-token cross entropy."""
    mask = loss_mask.float()
    return -(per_token_loss.float() * mask).sum(dim=1), mask.sum(dim=1)


# ---- DPO objective -----------------------------------------------------------------------------
DPO_STATS = ["loss_sum", "units", "rewards_chosen", "rewards_rejected", "margin", "correct",
             "nll"]


class DPOObjective(ChatObjective):
    name = kind = "dpo"
    sequences_per_sample = 2
    valid_alphas = "train"  # the forward the reference log-probs were computed with

    def __init__(self, args):
        super().__init__(args)
        self.reference_logps: dict = {}  # prefix -> {"logps": [N, 2], "lengths": [N, 2]}
        self.reference_model = None

    def describe(self) -> str:
        a = self.args
        return (f"dpo ({a.dpo_loss}, beta {a.dpo_beta:g}"
                + (f", nll weight {a.dpo_nll_weight:g}" if a.dpo_nll_weight else "")
                + f", {a.reference_mode} reference)")

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

    def stat_names(self, labels: tuple) -> list:
        return list(DPO_STATS)

    def loss(self, per_token_loss: torch.Tensor, batch: dict, labels: tuple) -> tuple:
        a = self.args
        logp, lengths = answer_logps(per_token_loss, batch["loss_mask"])
        ref = batch["ref_logps"].to(logp.dtype)
        ref_lengths = batch["ref_lengths"].to(logp.dtype)
        pc, pr, rc, rr = logp[0::2], logp[1::2], ref[:, 0], ref[:, 1]
        if a.dpo_loss == "ipo":  # length-normalised log-probabilities
            pc, pr = pc / lengths[0::2].clamp(min=1), pr / lengths[1::2].clamp(min=1)
            rc, rr = rc / ref_lengths[:, 0].clamp(min=1), rr / ref_lengths[:, 1].clamp(min=1)
        losses, chosen, rejected = dpo_loss(pc, pr, rc, rr, a.dpo_beta, a.dpo_loss)
        nll = -logp[0::2] / lengths[0::2].clamp(min=1)
        if a.dpo_nll_weight:
            losses = losses + a.dpo_nll_weight * nll
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
    def before_training(self, trainer) -> None:
        a = self.args
        reference = a.reference or a.init_from
        if reference is None:
            raise TrainingError("DPO needs a reference model: --init-from the SFT checkpoint (it "
                                "is the reference too) or --reference CKPT")
        self.reference_root = reference  # (read by tools/bench_posttrain.py)
        if a.reference_mode == "live":
            self.reference_model = build_reference_model(trainer, reference)
            trainer._print(f"reference model: {reference} (live, frozen)")
            return
        identity = reference_identity(reference)
        can_compute = (not trainer.resuming and a.init_from is not None
                       and os.path.realpath(a.init_from) == os.path.realpath(reference))
        todo = []
        for prefix in _chat_blends(trainer.phases):
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
        seq = max(p.seq_length for p in trainer.phases)
        for prefix in todo:
            reference_pass(trainer, prefix, seq, identity, self)
        for prefix in _chat_blends(trainer.phases):
            self.reference_logps[prefix] = load_reference_file(reference_file(prefix, identity))

    def prepare_batches(self, trainer, batches: list, run) -> list:
        """``--reference-mode live``: the frozen reference model's log-probs of the step's pairs
        (precomputed ones come with the samples: :class:`_WithReference`)."""
        if self.reference_model is not None:
            refs = reference_forward(trainer, self.reference_model, batches, run)
            for batch, (logps, lengths) in zip(batches, refs):
                batch["ref_logps"], batch["ref_lengths"] = logps, lengths
        return batches


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


# ---- reference log-probs -----------------------------------------------------------------------
def reference_identity(root: str) -> dict:
    """What a reference log-prob file binds to: the checkpoint's path, iteration and a fingerprint
    of its iteration directory (file names, sizes and modification times, and the contents of its
    small metadata files)."""
    from megatron_jai.checkpoint import dist as dist_ckpt

    iteration = dist_ckpt.latest_iteration(root)
    if iteration is None:
        raise TrainingError(f"reference {root}: no complete checkpoint there")
    path = dist_ckpt.iteration_dir(root, iteration)
    digest = hashlib.sha256()
    for name in sorted(os.listdir(path)):
        full = os.path.join(path, name)
        if not os.path.isfile(full):
            continue
        st = os.stat(full)
        digest.update(f"{name}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
        if st.st_size < (1 << 20):
            with open(full, "rb") as f:
                digest.update(f.read())
    return {"root": os.path.realpath(root), "iteration": iteration,
            "fingerprint": digest.hexdigest()}


def reference_file(prefix: str, identity: dict) -> str:
    """Where the reference log-probs of ``prefix`` under reference ``identity`` live."""
    tag = hashlib.sha256(f"{identity['root']}\0{identity['iteration']}".encode()).hexdigest()
    return f"{prefix}.dpo_ref.{tag[:12]}.npz"


def check_reference_file(path: str, prefix: str, identity: dict) -> Optional[str]:
    """None when ``path`` holds the reference log-probs of ``prefix`` under ``identity``; else
    a one-line reason."""
    from megatron_jai.data.chat import dataset_fingerprint

    try:
        meta = json.loads(str(numpy.load(path)["meta"]))
    except (OSError, ValueError, KeyError) as err:
        return f"reference log-probs {path} are unreadable ({err})"
    if meta.get("format") != REF_FORMAT:
        return f"reference log-probs {path} have format {meta.get('format')}, not {REF_FORMAT}"
    if meta.get("dataset_fingerprint") != dataset_fingerprint(prefix):
        return f"stale reference log-probs {path}: computed for other data than {prefix} holds now"
    ref = meta.get("reference", {})
    if (ref.get("root"), ref.get("iteration"), ref.get("fingerprint")) != \
            (identity["root"], identity["iteration"], identity["fingerprint"]):
        return (f"stale reference log-probs {path}: computed with reference {ref.get('root')} "
                f"iteration {ref.get('iteration')}, not {identity['root']} iteration "
                f"{identity['iteration']}" + (" (same path, changed files)"
                                               if ref.get("root") == identity["root"] else ""))
    return None


def load_reference_file(path: str) -> dict:
    data = numpy.load(path)
    return {"logps": data["logps"], "lengths": data["lengths"]}


def _write_reference_file(path: str, prefix: str, identity: dict, logps, lengths,
                          seq_length: int) -> None:
    from megatron_jai.data.chat import dataset_fingerprint

    meta = {"format": REF_FORMAT, "dataset": os.path.abspath(prefix),
            "dataset_fingerprint": dataset_fingerprint(prefix), "reference": identity,
            "seq_length": seq_length, "records": int(len(logps)),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    tmp = f"{path}.tmp{os.getpid()}.npz"
    numpy.savez(tmp, logps=logps, lengths=lengths, meta=numpy.array(json.dumps(meta)))
    os.replace(tmp, path)


class _Cycle(torch.utils.data.Dataset):
    """Index ``i`` -> ``dataset[i % len]``: pads a pass to whole global batches."""

    def __init__(self, dataset, total: int):
        self.dataset, self.total = dataset, total

    def __len__(self):
        return self.total

    def __getitem__(self, i):
        return self.dataset[i % len(self.dataset)]


def _logps_forward_step(collect: list):
    """A forward step for Megatron's schedule that keeps each pair's answer log-probs."""

    def forward_step(data_iter, model):
        batch = next(data_iter)
        output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])

        def loss_func(per_token_loss):
            logp, lengths = answer_logps(per_token_loss, batch["loss_mask"])
            collect.append((logp.detach().view(-1, 2).double(), lengths.view(-1, 2).double(),
                            batch))
            return per_token_loss.sum() * 0.0, {}

        return output, loss_func

    return forward_step


def _forward_only(trainer, model, batches: list, seq_length: int, mbs: int) -> list:
    """Train-mode forward without gradients (the policy's own forward), as Megatron's schedule
    runs it; returns ``[(logps [B, 2], lengths [B, 2], batch)]`` on the last stage."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    collect: list = []
    # The routers' load counts for aux-loss-free balancing belong to training steps only.
    counters = [m.local_tokens_per_expert for m in model.modules()
                if isinstance(getattr(m, "local_tokens_per_expert", None), torch.Tensor)]
    saved = [c.clone() for c in counters]
    with torch.no_grad():
        get_forward_backward_func()(
            forward_step_func=_logps_forward_step(collect), data_iterator=iter(batches),
            model=[model], num_microbatches=len(batches), seq_length=seq_length,
            micro_batch_size=2 * mbs, forward_only=True)
        for counter, value in zip(counters, saved):
            counter.copy_(value)
    if trainer.cfg.is_moe:  # the reference's routing is not the next step's statistics
        from megatron_jai.moe.layer import collect_router_stats

        collect_router_stats(model)
    return collect


def reference_pass(trainer, prefix: str, seq_length: int, identity: dict, objective) -> str:
    """Compute and store the reference log-probs of every pair of ``prefix`` with the model as it
    is now (the reference), forward only, over every DP rank. Collective."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_jai.data.chat import build_chat_dataset
    from megatron_jai.training.data_loading import data_iterator

    a = trainer.args
    mbs, dp = a.micro_batch_size, trainer.dp
    dataset = build_chat_dataset("dpo", prefix, seq_length, num_samples=None)
    n = len(dataset)
    per_step = mbs * dp
    total = math.ceil(n / per_step) * per_step
    it = data_iterator(_Cycle(dataset, total), 0, total, mbs, trainer.dp_rank, dp,
                       a.num_workers, objective.collate)
    sums = torch.zeros(n, 4, dtype=torch.float64, device=trainer.device)  # logps, lengths
    counts = torch.zeros(n, dtype=torch.float64, device=trainer.device)
    chunk = 16
    steps = total // per_step
    t0, done = time.perf_counter(), 0
    trainer.ddp_model.train()
    from megatron_jai.cli import progress

    bar = progress(total=steps, desc=f"reference log-probs {os.path.basename(prefix)}",
                   unit="batch", enabled=trainer.rank == 0, leave=False)
    while done < steps:
        batches = []
        for _ in range(min(chunk, steps - done)):
            batch = next(it)
            batches.append({k: v.to(trainer.device) for k, v in batch.items()})
        results = _forward_only(trainer, trainer.ddp_model, batches, seq_length, mbs)
        if ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0:
            for logps, lengths, batch in results:
                rows = batch["record_index"].to(trainer.device)
                sums.index_add_(0, rows, torch.cat([logps, lengths], dim=1))
                counts.index_add_(0, rows, torch.ones_like(rows, dtype=torch.float64))
        done += len(batches)
        bar.update(len(batches))
    bar.close()
    dist.all_reduce(sums)
    dist.all_reduce(counts)
    elapsed = time.perf_counter() - t0
    path = reference_file(prefix, identity)
    if bool((counts == 0).any()):  # the same on every rank (all-reduced)
        raise TrainingError(f"reference pass over {prefix}: some pairs were not scored")
    if trainer.rank == 0:
        values = (sums / counts[:, None]).cpu().numpy()
        _write_reference_file(path, prefix, identity, values[:, :2], values[:, 2:], seq_length)
        tokens = 2 * total * seq_length
        trainer._print(f"reference log-probs: {n} pairs of {prefix} in {elapsed:.1f}s "
                       f"({tokens / max(elapsed, 1e-9):,.0f} tokens/s, forward only) -> {path}")
    dist.barrier()
    return path


def build_reference_model(trainer, root: str):
    """A frozen copy of the architecture with the reference weights (``--reference-mode live``)."""
    from megatron.core.transformer.module import Float16Module

    from megatron_jai.checkpoint.dist import load_checkpoint
    from megatron_jai.model import build_model

    model = build_model(trainer.cfg, trainer.tcfg)
    try:
        load_checkpoint(root, [model])
    except FileNotFoundError as err:
        raise TrainingError(f"reference {root}: {err}") from None
    model = Float16Module(trainer.tcfg, model) if trainer.args.bf16 else model
    for p in model.parameters():
        p.requires_grad_(False)
    model.train()  # the policy's forward (train-mode skip alphas); no gradients are taken
    return model


def reference_forward(trainer, model, batches: list, run) -> list:
    """The live reference's log-probs of the step's micro-batches (last stage; None elsewhere)."""
    results = _forward_only(trainer, model, batches, run.phase.seq_length, run.mbs)
    if not results:
        return [(None, None)] * len(batches)
    return [(logps, lengths) for logps, lengths, _ in results]


class DPOReferenceOnly(DPOObjective):
    """``posttrain_jai.py dpo-reference``: the reference pass over every dataset, no training."""

    name = "dpo-reference"
    trains = False

    def describe(self) -> str:
        return "dpo-reference (forward only)"
