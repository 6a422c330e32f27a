"""DPO's reference log-probabilities: the pass that computes them once, forward only, the file
beside each dataset that keeps them, and the live reference model (``--reference-mode live``).

The reference log-probabilities of every pair are stored as ``PREFIX.dpo_ref.<tag>.npz`` (the tag
names the reference checkpoint and iteration), so training holds one model. The file records the
dataset's fingerprint and the reference checkpoint's identity; a mismatch (other data, a re-saved
checkpoint) is refused. The reference runs the same forward as the policy's training step
(train-mode DUS skip alphas, no gradients), so with policy = reference the first loss is exactly
``log 2``.

The functions take the objective's context (:class:`~.base.ObjectiveContext`) and read only its
``args``, ``cfg``, ``tcfg``, ``device``, ``dp``/``dp_rank``/``rank``, ``ddp_model`` and ``log``.
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

from megatron_jai.training.faults import TrainingError

REF_FORMAT = 1


def answer_logps(per_token_loss: torch.Tensor, loss_mask: torch.Tensor) -> tuple:
    """``(log-prob sums [2B], answer lengths [2B])`` from Megatron's per-token cross entropy
    (in fp32 at least)."""
    mask = loss_mask.float()
    loss = per_token_loss.to(torch.promote_types(per_token_loss.dtype, torch.float32))
    return -(loss * mask).sum(dim=1), mask.sum(dim=1)


# ---- the file ----------------------------------------------------------------------------------
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


# ---- the forward -------------------------------------------------------------------------------
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


def _forward_only(ctx, model, batches: list, seq_length: int, mbs: int) -> list:
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
    if ctx.cfg.is_moe:  # the reference's routing is not the next step's statistics
        from megatron_jai.moe.layer import collect_router_stats

        collect_router_stats(model)
    return collect


def reference_pass(ctx, prefix: str, seq_length: int, identity: dict, collate) -> str:
    """Compute and store the reference log-probs of every pair of ``prefix`` with the model as it
    is now (the reference), forward only, over every DP rank (``collate``: the objective's).
    Collective."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_jai.cli import progress
    from megatron_jai.data.chat import build_chat_dataset
    from megatron_jai.training.data_loading import data_iterator

    a = ctx.args
    mbs, dp = a.micro_batch_size, ctx.dp
    dataset = build_chat_dataset("dpo", prefix, seq_length, num_samples=None)
    n = len(dataset)
    per_step = mbs * dp
    total = math.ceil(n / per_step) * per_step
    it = data_iterator(_Cycle(dataset, total), 0, total, mbs, ctx.dp_rank, dp,
                       a.num_workers, collate)
    sums = torch.zeros(n, 4, dtype=torch.float64, device=ctx.device)  # logps, lengths
    counts = torch.zeros(n, dtype=torch.float64, device=ctx.device)
    chunk = 16
    steps = total // per_step
    t0, done = time.perf_counter(), 0
    ctx.ddp_model.train()
    # A bar on a terminal; a log file gets a plain line a minute.
    bar = progress(total=steps, desc=f"reference log-probs {os.path.basename(prefix)}",
                   unit="batch", enabled=ctx.rank == 0, leave=False)
    while done < steps:
        batches = []
        for _ in range(min(chunk, steps - done)):
            batch = next(it)
            batches.append({k: v.to(ctx.device) for k, v in batch.items()})
        results = _forward_only(ctx, ctx.ddp_model, batches, seq_length, mbs)
        if ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0:
            for logps, lengths, batch in results:
                rows = batch["record_index"].to(ctx.device)
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
    if ctx.rank == 0:
        values = (sums / counts[:, None]).cpu().numpy()
        _write_reference_file(path, prefix, identity, values[:, :2], values[:, 2:], seq_length)
        tokens = 2 * total * seq_length
        ctx.log(f"reference log-probs: {n} pairs of {prefix} in {elapsed:.1f}s "
                f"({tokens / max(elapsed, 1e-9):,.0f} tokens/s, forward only) -> {path}")
    dist.barrier()
    return path


def build_reference_model(ctx, root: str):
    """A frozen copy of the architecture with the reference weights (``--reference-mode live``)."""
    from megatron.core.transformer.module import Float16Module

    from megatron_jai.checkpoint.dist import load_checkpoint
    from megatron_jai.model import build_model

    model = build_model(ctx.cfg, ctx.tcfg)
    try:
        load_checkpoint(root, [model])
    except FileNotFoundError as err:
        raise TrainingError(f"reference {root}: {err}") from None
    model = Float16Module(ctx.tcfg, model) if ctx.args.bf16 else model
    for p in model.parameters():
        p.requires_grad_(False)
    model.train()  # the policy's forward (train-mode skip alphas); no gradients are taken
    return model


def reference_forward(ctx, model, batches: list, run) -> list:
    """The live reference's log-probs of the step's micro-batches (last stage; None elsewhere)."""
    results = _forward_only(ctx, model, batches, run.phase.seq_length, run.mbs)
    if not results:
        return [(None, None)] * len(batches)
    return [(logps, lengths) for logps, lengths, _ in results]
