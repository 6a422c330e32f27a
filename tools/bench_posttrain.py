#!/usr/bin/env python
"""Speed and memory of post-training (issue 9): the DPO reference pass (forward only), a DPO step
of N pairs and an SFT step of 2N sequences of the same length, on one model.

    python tools/bench_posttrain.py                              # GPU: the 2B JAI-shaped MoE, 2048 tokens
    python tools/bench_posttrain.py --model tiny --pairs 4 --seq-length 128 --steps 3
    python tools/bench_posttrain.py --model runs/x/model_config.json --sft-data P --dpo-data Q --check
    torchrun --nproc_per_node 2 tools/bench_posttrain.py --tp 2 ...

Everything runs through posttrain_jai.py's own Trainer and objectives, in this process (under
torchrun for TP/PP/EP/DP): an SFT trainer (global batch 2N sequences, micro-batches of 2m) trains
--warmup-steps + --steps steps and saves its model; a DPO trainer (global batch N pairs,
micro-batches of m pairs, i.e. the same [2m, S] tensors) starts from that checkpoint, which is its
reference: its reference pass runs once as warm-up and writes PREFIX.dpo_ref.<tag>.npz, then runs
again, measured; then it trains the same number of steps. Each sample is exactly --seq-length
tokens (prompt, then an answer of --answer-fraction of them under the loss mask), random ids of the
model's vocabulary (random "chat-shaped" data in a temporary directory), unless --sft-data /
--dpo-data give chat datasets (tools/preprocess_chat.py; sequences are padded to --seq-length, so
the step costs the same).

Measured: the step's own wall time (Trainer.train_step: data, forward, backward, optimizer) and
the process's CPU time over it (all threads: on a shared machine the wall time also holds waiting
for other jobs); tokens/s counts every position of every sequence (2N x S per step, 2 x pairs x S for the
reference pass). Peak memory: on GPU torch.cuda.max_memory_allocated during the step / pass (all
that is allocated: weights, gradients, optimizer state, activations), and its increase over the
start; on CPU the peak resident set size (VmHWM, reset through /proc/self/clear_refs after
malloc_trim) and its increase over the start -- the ratio uses the increase there (activations and
temporaries; the process's ~1 GB of libraries would hide any difference). The slowest rank and the
largest peak of all ranks are reported. Targets: DPO step / SFT step <= 1.15 in time and in peak
memory; reference pass >= 2.5 x the DPO step's tokens/s. --check: exit 1 when one is missed.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import shutil
import sys
import tempfile
import time

import numpy
import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from megatron_jai.cli import HelpFormatter, UserError  # noqa: E402

PROG = "bench_posttrain.py"
GPU_MODEL = os.path.join(REPO_ROOT, "examples", "jai_2b_model.json")
TIME_RATIO_MAX = MEMORY_RATIO_MAX = 1.15
REFERENCE_SPEEDUP_MIN = 2.5


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--model", default=None,
                   help="preset, model_config.json or checkpoint directory (its architecture; "
                        "weights are random) (default: examples/jai_2b_model.json on GPU, "
                        "tiny on CPU)")
    p.add_argument("--pairs", type=int, default=4, help="N: DPO pairs per step (the SFT step has 2N "
                                                        "sequences)")
    p.add_argument("--micro-batch-size", type=int, default=1,
                   help="pairs per micro-batch (SFT: twice as many sequences)")
    p.add_argument("--seq-length", type=int, default=None,
                   help="tokens per sequence (default: 2048 on GPU, 128 on CPU)")
    p.add_argument("--steps", type=int, default=3, help="measured training steps of each kind")
    p.add_argument("--warmup-steps", type=int, default=1, help="steps before the measured ones")
    p.add_argument("--reference-pairs", type=int, default=None,
                   help="pairs of the generated DPO data, i.e. of the reference pass (default: "
                        "what the DPO steps read, (warm-up + steps) x N, at least 32)")
    p.add_argument("--answer-fraction", type=float, default=0.5,
                   help="generated data: the share of each sequence under the loss mask")
    p.add_argument("--sft-data", default=None, help="SFT chat dataset prefix instead of generated data")
    p.add_argument("--dpo-data", default=None, help="DPO chat dataset prefix instead of generated data")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--ep", type=int, default=1)
    p.add_argument("--recompute-activations", action="store_true")
    p.add_argument("--work-dir", default=None,
                   help="where data and the checkpoint go (default: a temporary directory, removed "
                        "at the end; shared by all ranks)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the results as JSON")
    p.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    return p


# ---- data --------------------------------------------------------------------------------------
def write_random_chat(prefix: str, kind: str, records: int, seq_length: int, vocab_size: int,
                      answer_fraction: float, seed: int) -> None:
    """A chat dataset in preprocess_chat's format (tokens, loss mask, meta) of ``records``
    conversations (SFT) or pairs (DPO, chosen and rejected sharing the prompt), every sequence
    exactly ``seq_length`` random ids."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from megatron_jai.data.chat import MASK_SUFFIX, mask_prefix
    from megatron_jai.data.preprocess import index_dtype, output_paths

    rng = numpy.random.default_rng(seed)
    dtype = numpy.dtype(index_dtype(vocab_size))
    answer = max(1, min(seq_length - 1, round(answer_fraction * seq_length)))
    mask = numpy.zeros(seq_length, dtype=numpy.uint8)
    mask[seq_length - answer:] = 1
    per_record = 1 if kind == "sft" else 2
    tok_bin, tok_idx, meta_path = output_paths(prefix)
    mask_bin, mask_idx, _ = output_paths(mask_prefix(prefix))
    tokens, masks = IndexedDatasetBuilder(tok_bin, dtype=dtype.type), \
        IndexedDatasetBuilder(mask_bin, dtype=numpy.uint8)
    eod = vocab_size - 1
    for _ in range(records):
        prompt = rng.integers(0, eod, seq_length - answer)
        seqs = [numpy.concatenate([prompt, rng.integers(0, eod, answer)]) for _ in range(per_record)]
        tokens.add_document(numpy.concatenate(seqs).astype(dtype), [seq_length] * per_record)
        masks.add_document(numpy.tile(mask, per_record), [seq_length] * per_record)
    tokens.finalize(tok_idx)
    masks.finalize(mask_idx)
    n = records * per_record
    meta = {"kind": kind, "tokenizer": None, "generated_by": PROG, "vocab_size": vocab_size,
            "eod": eod, "pad_id": eod, "seq_length": seq_length, "records": records,
            "sequences": n, "tokens": n * seq_length, "loss_tokens": n * answer,
            "max_length": seq_length, "mask_prefix_suffix": MASK_SUFFIX}
    with open(meta_path, "w") as f:
        json.dump(meta, f, indent=2)


def check_dataset(prefix: str, kind: str, seq_length: int) -> None:
    from megatron_jai.data.chat import read_chat_meta

    meta = read_chat_meta(prefix, kind)
    if meta.get("max_length", 0) > seq_length:
        raise UserError(f"{prefix} holds sequences of up to {meta['max_length']} tokens: use "
                        f"--seq-length {meta['max_length']} or more")


# ---- memory ------------------------------------------------------------------------------------
def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"no {field} in /proc/self/status")


@contextlib.contextmanager
def memory_window(device: torch.device):
    """Peak bytes while the block runs: ``out["peak"]`` (absolute) and ``out["increase"]`` (over
    the start). GPU: allocated tensor memory; CPU: resident set size (module docstring)."""
    out = {}
    if device.type == "cuda":
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        yield out
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        gc.collect()
        with contextlib.suppress(OSError, AttributeError):  # glibc: give freed heap back
            import ctypes

            ctypes.CDLL("libc.so.6").malloc_trim(0)
        start = _proc_status_kib("VmRSS") * 1024
        try:
            with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM to the current RSS
                f.write("5")
        except OSError as err:
            raise UserError(f"peak memory on CPU needs Linux's /proc/self/clear_refs ({err})") from None
        yield out
        peak = _proc_status_kib("VmHWM") * 1024
    out.update(peak=peak, increase=max(0, peak - start))


class MeasuredSteps:
    """Stands in for a Trainer's ``train_step``: the same step, with its wall time and memory."""

    def __init__(self, trainer):
        self.step, self.device, self.rows = trainer.train_step, trainer.device, []

    def __call__(self, run, preemption):
        with memory_window(self.device) as mem:
            cpu = time.process_time()
            result = self.step(run, preemption)
            cpu = time.process_time() - cpu
        self.rows.append({"seconds": result.elapsed, "cpu_seconds": cpu,
                          "loss": result.metrics["loss"], **mem})
        return result


def measured_dpo_objective(args, results: dict):
    """posttrain_jai.py's DPO objective whose reference pass (before the first step) is measured:
    the first pass writes the reference file (warm-up), the second is timed."""
    from megatron_jai.training.objectives import dpo_reference
    from megatron_jai.training.objectives.dpo import DPOObjective
    from megatron_jai.training.objectives.sft import chat_prefixes

    class MeasuredDPO(DPOObjective):
        def before_training(self, ctx):
            super().before_training(ctx)
            prefix = chat_prefixes(ctx.phases)[0]
            identity = dpo_reference.reference_identity(self.reference_root)
            seq = ctx.phases[0].seq_length
            with memory_window(ctx.device) as mem:
                t0, cpu = time.perf_counter(), time.process_time()
                dpo_reference.reference_pass(ctx, prefix, seq, identity, self.collate)
                if ctx.device.type == "cuda":
                    torch.cuda.synchronize()
                seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu
            pairs = len(self.reference_logps[prefix]["logps"])
            results["reference"] = {"seconds": seconds, "cpu_seconds": cpu, "pairs": pairs,
                                    "tokens": 2 * pairs * seq, **mem}

    return MeasuredDPO(args)


# ---- the runs ----------------------------------------------------------------------------------
def trainer_flags(a, data: str, gbs: int, mbs: int) -> list:
    flags = ["--model", a.model, "--data-path", data, "--seq-length", a.seq_length,
             "--global-batch-size", gbs, "--micro-batch-size", mbs,
             "--train-iters", a.warmup_steps + a.steps, "--tp", a.tp, "--pp", a.pp, "--ep", a.ep,
             "--lr", 1e-5, "--min-lr", 1e-5, "--warmup-iters", 0, "--log-interval", 10 ** 6,
             "--data-cache-dir", os.path.join(a.work_dir, "cache")]
    return [str(f) for f in flags] + (["--recompute-activations"] if a.recompute_activations else [])


def train(mode: str, argv: list, results: dict):
    """One posttrain_jai.py trainer, set up and trained with measured steps; its Trainer."""
    import posttrain_jai
    from megatron_jai.training.arguments import parse_args
    from megatron_jai.training.loop import Trainer

    args = parse_args(argv, posttrain_jai.mode_parser(mode))
    objective = measured_dpo_objective(args, results) if mode == "dpo" else \
        posttrain_jai.objective_for(mode)(args)
    trainer = Trainer(args, objective)
    trainer.setup()
    meter = trainer.train_step = MeasuredSteps(trainer)
    trainer.train()
    results[mode] = meter.rows
    return trainer


def summarize(rows: list, warmup: int, tokens: int) -> dict:
    timed = rows[warmup:]
    seconds = sum(r["seconds"] for r in timed) / len(timed)
    return {"seconds": seconds, "cpu_seconds": sum(r["cpu_seconds"] for r in timed) / len(timed),
            "tokens": tokens, "tokens_per_s": tokens / seconds,
            "peak": max(r["peak"] for r in timed), "increase": max(r["increase"] for r in timed),
            "loss": [r["loss"] for r in rows]}


def reduce_over_ranks(table: dict, device) -> dict:
    """The slowest rank's time and the largest peak of all ranks."""
    import torch.distributed as dist

    keys = [(name, k) for name in sorted(table)
            for k in ("seconds", "cpu_seconds", "peak", "increase")]
    values = torch.tensor([float(table[n][k]) for n, k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(values, op=dist.ReduceOp.MAX)
    for (name, k), v in zip(keys, values.tolist()):
        table[name][k] = v
    for row in table.values():
        row["tokens_per_s"] = row["tokens"] / row["seconds"]
    return table


def targets(table: dict, on_gpu: bool) -> list:
    memory = "peak" if on_gpu else "increase"
    return [("DPO step / SFT step, time", table["dpo"]["seconds"] / table["sft"]["seconds"],
             "<=", TIME_RATIO_MAX),
            (f"DPO step / SFT step, memory ({'peak' if on_gpu else 'peak increase'})",
             table["dpo"][memory] / max(table["sft"][memory], 1), "<=", MEMORY_RATIO_MAX),
            ("reference pass / DPO step, tokens/s",
             table["reference"]["tokens_per_s"] / table["dpo"]["tokens_per_s"], ">=",
             REFERENCE_SPEEDUP_MIN)]


def passed(value: float, op: str, limit: float) -> bool:
    return value <= limit if op == "<=" else value >= limit


def print_report(a, table: dict, checks: list, title: str) -> None:
    mib = 2 ** 20
    print(title)
    header = (f"{'measured':<34} {'wall s':>9} {'CPU s':>8} {'tokens/s':>10} {'peak MiB':>10} "
              f"{'+MiB':>9}")
    print(header)
    print("-" * len(header))
    names = {"reference": f"reference pass ({table['reference']['pairs']} pairs, forward)",
             "dpo": f"DPO step ({a.pairs} pairs)", "sft": f"SFT step ({2 * a.pairs} sequences)"}
    for key in ("reference", "dpo", "sft"):
        r = table[key]
        print(f"{names[key]:<34} {r['seconds']:>9.3f} {r['cpu_seconds']:>8.2f} "
              f"{r['tokens_per_s']:>10,.0f} {r['peak'] / mib:>10,.1f} {r['increase'] / mib:>9,.1f}")
    print()
    header = f"{'target':<44} {'value':>7} {'limit':>8}  result"
    print(header)
    print("-" * len(header))
    for name, value, op, limit in checks:
        print(f"{name:<44} {value:>7.2f} {op + ' ' + format(limit, 'g'):>8}  "
              f"{'PASS' if passed(value, op, limit) else 'FAIL'}")


def main(argv=None) -> int:
    import torch.distributed as dist

    from megatron_jai import parallel
    from megatron_jai.presets import load_model_config

    a = build_parser().parse_args(argv)
    on_gpu = torch.cuda.is_available()
    a.model = a.model or (GPU_MODEL if on_gpu else "tiny")
    a.seq_length = a.seq_length or (2048 if on_gpu else 128)
    if min(a.pairs, a.micro_batch_size, a.seq_length - 1, a.steps, a.tp, a.pp, a.ep) < 1 \
            or a.warmup_steps < 0 or (a.reference_pairs is not None and a.reference_pairs < 1):
        raise UserError("--pairs, --micro-batch-size, --steps, --reference-pairs, --tp, --pp, --ep "
                        "must be positive, --seq-length above 1 and --warmup-steps not negative")
    if not 0 < a.answer_fraction < 1:
        raise UserError(f"--answer-fraction must be in (0, 1), got {a.answer_fraction}")
    try:
        cfg = load_model_config(a.model)
    except (ValueError, OSError) as err:
        raise UserError(str(err)) from None
    try:
        parallel.initialize(a.tp, a.pp, a.ep)
    except ValueError as err:
        raise UserError(str(err)) from None
    rank0, owned = dist.get_rank() == 0, a.work_dir is None
    try:
        dp, mbs = dist.get_world_size() // (a.tp * a.pp), a.micro_batch_size
        if a.pairs % (mbs * dp):
            raise UserError(f"--pairs {a.pairs} must be a multiple of micro-batch {mbs} x DP {dp}")
        work = [a.work_dir]
        if rank0:
            work[0] = work[0] or tempfile.mkdtemp(prefix="bench_posttrain_")
            os.makedirs(work[0], exist_ok=True)
        dist.broadcast_object_list(work, src=0)
        a.work_dir = work[0]
        results: dict = {}
        error = [None]
        if rank0:
            try:
                for kind, given, records in (
                        ("sft", a.sft_data, 2 * a.pairs),
                        ("dpo", a.dpo_data,
                         a.reference_pairs or max(32, (a.warmup_steps + a.steps) * a.pairs))):
                    if given:
                        check_dataset(given, kind, a.seq_length)
                    else:
                        write_random_chat(os.path.join(a.work_dir, kind), kind, records,
                                          a.seq_length, cfg.vocab_size, a.answer_fraction,
                                          seed=1 if kind == "sft" else 2)
            except UserError as err:
                error[0] = str(err)
        dist.broadcast_object_list(error, src=0)
        if error[0]:
            raise UserError(error[0])
        sft_data = a.sft_data or os.path.join(a.work_dir, "sft")
        dpo_data = a.dpo_data or os.path.join(a.work_dir, "dpo")
        sft_ckpt = os.path.join(a.work_dir, "sft_checkpoint")
        trainer = train("sft", trainer_flags(a, sft_data, 2 * a.pairs, 2 * mbs)
                        + ["--save", sft_ckpt, "--overwrite-save"], results)
        del trainer
        gc.collect()
        if on_gpu:
            torch.cuda.empty_cache()
        trainer = train("dpo", trainer_flags(a, dpo_data, a.pairs, mbs)
                        + ["--init-from", sft_ckpt, "--recompute-reference"], results)
        tokens = 2 * a.pairs * a.seq_length
        table = {"reference": {**results["reference"]},
                 "dpo": summarize(results["dpo"], a.warmup_steps, tokens),
                 "sft": summarize(results["sft"], a.warmup_steps, tokens)}
        table = reduce_over_ranks(table, trainer.device)
        checks = targets(table, on_gpu)
        where = torch.cuda.get_device_name() if on_gpu else "CPU"
        title = (f"{PROG}: {where}, model {cfg.name} ({cfg.parameter_counts()['total'] / 1e6:.1f}M "
                 f"parameters), TP={a.tp} PP={a.pp} EP={a.ep} DP={dp}, "
                 f"{'bf16' if trainer.args.bf16 else 'fp32'}, {a.seq_length} tokens per sequence, "
                 f"micro-batch {mbs} pairs / {2 * mbs} sequences, {a.steps} measured steps after "
                 f"{a.warmup_steps} warm-up; memory: "
                 + ("torch.cuda.max_memory_allocated" if on_gpu else "peak RSS (VmHWM)"))
        if rank0:
            print_report(a, table, checks, title)
            if a.json:
                tmp = f"{a.json}.tmp{os.getpid()}"
                with open(tmp, "w") as f:
                    json.dump({"title": title, "measured": table,
                               "targets": [{"name": n, "value": v, "op": op, "limit": lim,
                                            "pass": passed(v, op, lim)}
                                           for n, v, op, lim in checks]}, f, indent=2)
                os.replace(tmp, a.json)
        return 1 if a.check and not all(passed(*c[1:]) for c in checks) else 0
    finally:
        if dist.is_initialized():
            dist.barrier()
        if rank0 and owned and a.work_dir:
            shutil.rmtree(a.work_dir, ignore_errors=True)
        parallel.destroy()


if __name__ == "__main__":
    from megatron_jai import cli

    sys.exit(cli.run(PROG, main))
