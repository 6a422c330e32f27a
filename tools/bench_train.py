#!/usr/bin/env python
"""One-GPU training throughput of a run config's model (default: examples/jai_1gpu.yaml, the 2B JAI-shaped
MoE, at its 4K phase length): tokens/s, TFLOP/s, MFU and peak memory, with our MoE layer and
Megatron-Core's own MoE layer side by side.

    python tools/bench_train.py                          # both MoE layers, one GPU
    python tools/bench_train.py --layers jai --steps 10 --global-batch-size 16
    python tools/bench_train.py --smoke                  # tiny-moe on CPU: exercises the script only

Each layer is a fresh pretrain_jai.py trainer (megatron_jai.training) in this process, training on the
project's demo corpus (throughput does not depend on the text) for --steps optimizer steps of
--global-batch-size sequences (micro-batch size from the config). The first --warmup-steps
(compilation, autotuning, allocator warm-up) are left out of the averages. The MoE layer is chosen
through the layer spec (JAI_MOE_LAYER=jai|mcore, megatron_jai/model/spec.py); Megatron-Core's uses
Transformer Engine's grouped GEMM when TE is importable, else its loop over experts (SequentialMLP).
TFLOP/s is the trainer's model FLOPs (6 x active parameters + attention, PaLM convention) over the
step time, MFU that over --peak-tflops (the config's; 989 = H100/H200 dense bf16), peak memory
torch.cuda.max_memory_allocated over the whole run. Exit 1 when a layer fails to train.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import traceback

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from megatron_jai.cli import UserError  # noqa: E402

LAYERS = ("jai", "mcore")
DEFAULT_CONFIG = os.path.join(REPO_ROOT, "examples", "jai_1gpu.yaml")


def read_run_config(path: str) -> dict:
    """The settings of a pretrain_jai.py YAML that shape throughput (model, micro-batch, precision,
    optimizer, MFU peak, the first phase's sequence length)."""
    import yaml

    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except yaml.YAMLError as err:
        raise UserError(f"config {path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(data, dict) or "model" not in data:
        raise UserError(f"config {path} has no model: setting")
    model = str(data["model"])
    from megatron_jai.presets import PRESETS

    if model not in PRESETS and not os.path.isabs(model):
        model = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(path)), model))
    phases = data.get("phases") or []
    seq = (data.get("plan") or {}).get("seq_length") or (phases[0].get("seq_length") if phases else None) \
        or data.get("seq_length") or 4096
    return {"model": model, "micro_batch_size": int(data.get("micro_batch_size", 1)),
            "bf16": data.get("bf16"), "use_distributed_optimizer": data.get("use_distributed_optimizer"),
            "peak_tflops": data.get("peak_tflops"), "lr": float(data.get("lr", 3e-4)), "seq_length": int(seq)}


def trainer_flags(run: dict, args, metrics_file: str) -> list:
    flags = ["--model", run["model"], "--seq-length", args.seq_length, "--micro-batch-size",
             run["micro_batch_size"], "--global-batch-size", args.global_batch_size, "--train-iters", args.steps,
             "--lr", run["lr"], "--warmup-iters", 1, "--log-interval", args.steps, "--metrics-file", metrics_file,
             "--seed", 1234]
    if run["bf16"] is not None:
        flags.append("--bf16" if run["bf16"] else "--fp32")
    if run["use_distributed_optimizer"] is not None:
        flags.append("--use-distributed-optimizer" if run["use_distributed_optimizer"]
                     else "--no-distributed-optimizer")
    if run["peak_tflops"]:
        flags += ["--peak-tflops", run["peak_tflops"]]
    if args.data_cache_dir:
        flags += ["--data-cache-dir", args.data_cache_dir]
    return [str(f) for f in flags]


def train_one(layer: str, run: dict, args) -> dict:
    """Train ``--steps`` steps with MoE layer ``layer``; the measured row (or ``error``)."""
    from megatron_jai import parallel
    from megatron_jai.training.arguments import parse_args
    from megatron_jai.training.loop import Trainer

    on_gpu = torch.cuda.is_available()
    os.environ["JAI_MOE_LAYER"] = layer  # read when the trainer builds the model's layer specs
    row = {"layer": layer}
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        metrics_file = os.path.join(tmp, "metrics.jsonl")
        trainer = None
        try:
            if on_gpu:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            trainer = Trainer(parse_args(trainer_flags(run, args, metrics_file)))
            trainer.setup()
            mlp = trainer.model.decoder.layers[0].mlp
            row["module"] = f"{type(mlp).__name__}/{type(getattr(mlp, 'experts', mlp)).__name__}"
            trainer.train()
            if on_gpu:
                row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        except Exception as err:  # noqa: BLE001 -- one failed layer is a row of the table, not the end
            row["error"] = " ".join(f"{type(err).__name__}: {err}".split())[:300]
            print(f"bench_train.py: the {layer} layer failed (an internal error, not bad input):", file=sys.stderr)
            traceback.print_exc()
            return row
        finally:
            parallel.destroy()
            del trainer
            gc.collect()
            os.environ.pop("JAI_MOE_LAYER", None)
        records = [json.loads(line) for line in open(metrics_file)]
    timed = records[args.warmup_steps:]
    seconds = sum(r["step_time_s"] for r in timed)
    tokens = sum(r["global_batch_size"] * r["seq_length"] for r in timed)
    tflops = sum(r["tflops_per_gpu"] * r["step_time_s"] for r in timed) / seconds
    row.update(step_ms=1e3 * seconds / len(timed), tokens_per_s=tokens / seconds, tflops=tflops,
               mfu=tflops / run["peak_tflops"] if run["peak_tflops"] else None,
               first_loss=records[0]["loss"], last_loss=records[-1]["loss"],
               warmup_s=sum(r["step_time_s"] for r in records[:args.warmup_steps]))
    return row


def print_table(rows, title):
    print(title)
    header = (f"{'MoE layer':<10} {'layer/experts module':<30} {'step ms':>9} {'tokens/s':>10} {'TFLOP/s':>8} "
              f"{'MFU':>6} {'peak GiB':>9} {'warm-up s':>9}  loss first -> last")
    print(header)
    print("-" * len(header))
    for r in rows:
        if "error" in r:
            print(f"{r['layer']:<10} {r.get('module', '-'):<30} failed: {r['error']}")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        peak = f"{r['peak_gib']:.1f}" if "peak_gib" in r else "-"
        print(f"{r['layer']:<10} {r['module']:<30} {r['step_ms']:>9.1f} {r['tokens_per_s']:>10,.0f} "
              f"{r['tflops']:>8.1f} {mfu:>6} {peak:>9} {r['warmup_s']:>9.1f}  "
              f"{r['first_loss']:.3f} -> {r['last_loss']:.3f}")


def environment_line() -> str:
    import megatron.core
    import triton

    try:
        import transformer_engine  # noqa: F401
        te = "Transformer Engine present"
    except ImportError:
        te = "no Transformer Engine"
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return (f"bench_train: {gpu}, torch {torch.__version__}, triton {triton.__version__}, megatron-core "
            f"{megatron.core.__version__}, {te}, MoE backend {os.environ.get('JAI_MOE_BACKEND', 'auto')}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=DEFAULT_CONFIG, help="pretrain_jai.py run config whose model to train")
    p.add_argument("--layers", default=",".join(LAYERS), help=f"comma list of {', '.join(LAYERS)}")
    p.add_argument("--seq-length", type=int, default=None, help="default: the config's first phase length")
    p.add_argument("--global-batch-size", type=int, default=8, help="sequences per optimizer step")
    p.add_argument("--steps", type=int, default=6, help="optimizer steps per layer")
    p.add_argument("--warmup-steps", type=int, default=2, help="first steps left out of the averages")
    p.add_argument("--data-cache-dir", default=None, help="where the demo corpus is (built on first use)")
    p.add_argument("--smoke", action="store_true", help="tiny-moe on CPU, fp32, 3 steps: exercises the script")
    args = p.parse_args(argv)
    layers = [x.strip() for x in args.layers.split(",") if x.strip()]
    if not layers or any(x not in LAYERS for x in layers):
        raise UserError(f"--layers: choose from {', '.join(LAYERS)}, got {args.layers!r}")
    if args.smoke:
        run = {"model": "tiny-moe", "micro_batch_size": 2, "bf16": False, "use_distributed_optimizer": False,
               "peak_tflops": None, "lr": 3e-3, "seq_length": 64}
        args.global_batch_size, args.steps, args.warmup_steps = 4, 3, 1
    else:
        if not torch.cuda.is_available():
            raise UserError("bench_train.py measures on a CUDA GPU and none is available; use --smoke for a "
                            "tiny CPU run of the script")
        run = read_run_config(args.config)
    args.seq_length = args.seq_length or run["seq_length"]
    if min(args.seq_length, args.global_batch_size, args.steps) < 1 or not 0 <= args.warmup_steps < args.steps:
        raise UserError("--seq-length, --global-batch-size and --steps must be positive, and --warmup-steps "
                        "below --steps")
    if args.global_batch_size % run["micro_batch_size"]:
        raise UserError(f"--global-batch-size {args.global_batch_size} must be a multiple of the micro-batch "
                        f"size {run['micro_batch_size']}")
    print(environment_line(), flush=True)
    rows = [train_one(layer, run, args) for layer in layers]
    model = os.path.basename(run["model"])
    title = (f"training table: {model}, sequence {args.seq_length}, {args.global_batch_size} sequences per "
             f"step ({args.global_batch_size // run['micro_batch_size']} micro-batches of "
             f"{run['micro_batch_size']}), {args.steps} steps (first {args.warmup_steps} not averaged)")
    print_table(rows, title + (" -- smoke run on CPU: not a measurement" if args.smoke else ""))
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    from megatron_jai import cli

    sys.exit(cli.run("bench_train.py", main))
