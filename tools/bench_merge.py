#!/usr/bin/env python
"""Speed and memory of merging against mergekit (docs/checkpoints.md, "Speed and memory against
mergekit"): each method merges the same model on both sides, ours from our checkpoints
(tools/merge_checkpoints.py --config), mergekit (mergekit-yaml) from their Hugging Face exports.

    python tools/bench_merge.py                                  # every method, 3 interleaved runs
    python tools/bench_merge.py --methods ties dare_linear --runs 1
    python tools/bench_merge.py --side ours --runs 1             # ours only (profiling a change)

The model (built once under --work, ~1.8 GB): a random bf16 dense model in the Phi-3 layout (14
layers, hidden 768, 12 heads and 4 KV heads, FFN 2560, vocabulary 32064: 154M parameters), a base
and two models base + N(0, 0.002), as our checkpoints and as their mcore-to-hf exports (Phi-3's
tokenizer from the shared directory). One mergekit YAML per method: both models weight 1, density
0.5 for ties, dare_*, breadcrumbs_ties; t 0.5 for slerp (from A to B); dtype bfloat16.

Each run is one process under ``/usr/bin/time -v`` (wall clock, CPU time of all its threads and
maximum resident set size) at ``nice -n --nice``; per run the methods go in turn, ours then mergekit's, so that a change in the
machine's load hits both. Prints one line per process, then the table of medians in markdown and
the range of the 1-minute load average seen.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from megatron_jai import cli  # noqa: E402

PROG = "bench_merge.py"
METHODS = ("linear", "slerp", "task_arithmetic", "ties", "dare_linear", "dare_ties",
           "breadcrumbs_ties", "model_stock")
SPARSE = {"ties", "dare_linear", "dare_ties", "breadcrumbs_ties"}  # density 0.5
NOISE = 0.002  # A and B: the base plus N(0, NOISE)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=cli.HelpFormatter)
    p.add_argument("--work", default=os.path.join(REPO_ROOT, ".cache", "bench-merge"),
                   help="where the models are built (once) and the merges written")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--runs", type=int, default=3, help="runs of each side per method (median)")
    p.add_argument("--side", choices=("both", "ours", "mergekit"), default="both")
    p.add_argument("--nice", type=int, default=5, help="niceness of both sides")
    p.add_argument("--tokenizer", default=os.path.join(
        os.environ.get("JAI_SHARED_DIR", os.path.join(REPO_ROOT, "..", "shared")), "tokenizers", "phi3"))
    return p


def build_models(work: str, tokenizer: str) -> dict:
    """{BASE, A, B: our checkpoint} and {BASE_hf, ...: its export}, built unless present."""
    paths = {n: os.path.join(work, n) for n in ("BASE", "A", "B")}
    paths.update({f"{n}_hf": os.path.join(work, f"{n}_hf") for n in ("BASE", "A", "B")})
    if all(os.path.isdir(p) for p in paths.values()):
        return paths
    import torch
    from transformers import Phi3Config, Phi3ForCausalLM

    from megatron_jai.checkpoint.convert import hf_to_mcore
    from megatron_jai.checkpoint.stream import CheckpointReader, CheckpointWriter
    from megatron_jai.hf.export import mcore_to_hf

    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    torch.manual_seed(0)
    config = Phi3Config(hidden_size=768, intermediate_size=2560, num_hidden_layers=14,
                        num_attention_heads=12, num_key_value_heads=4, vocab_size=32064,
                        max_position_embeddings=4096, tie_word_embeddings=False,
                        bos_token_id=1, eos_token_id=32000, pad_token_id=32000)
    Phi3ForCausalLM(config).to(torch.bfloat16).save_pretrained(os.path.join(work, "seed_hf"))
    hf_to_mcore(os.path.join(work, "seed_hf"), paths["BASE"], progress=False, name="bench-phi3",
                dtype=torch.bfloat16)
    shutil.rmtree(os.path.join(work, "seed_hf"))
    base = CheckpointReader(paths["BASE"])
    gen = torch.Generator().manual_seed(1)
    for name in ("A", "B"):
        with CheckpointWriter(paths[name], base.config) as w:
            for key in base.keys():
                def noisy(t):
                    return (t.float() + torch.randn(t.shape, generator=gen) * NOISE).to(t.dtype)
                if base.is_stacked(key):
                    n = base.shape(key)[0]
                    for i in range(n):
                        w.write_layer(key, i, n, noisy(base.read_layer(key, i)))
                else:
                    w.write(key, noisy(base.read(key)))
    for name in ("BASE", "A", "B"):
        mcore_to_hf(paths[name], paths[f"{name}_hf"], progress=False, tokenizer=tokenizer)
    return paths


def write_configs(work: str, paths: dict, method: str) -> tuple:
    """(ours, mergekit's) YAML of ``method``: the same merge, of our checkpoints / their exports."""
    import yaml

    files = []
    for suffix in ("", "_hf"):
        def model(name):
            return paths[name + suffix]
        params = {"weight": 1.0, **({"density": 0.5} if method in SPARSE else {})}
        config = {"merge_method": method, "dtype": "bfloat16"}
        if method == "linear":
            config["models"] = [{"model": model(n), "parameters": params} for n in ("A", "B")]
        elif method == "slerp":
            config.update(base_model=model("A"), parameters={"t": 0.5},
                          models=[{"model": model("A")}, {"model": model("B")}])
        elif method == "model_stock":
            config.update(base_model=model("BASE"), models=[{"model": model(n)} for n in ("A", "B")])
        else:
            config.update(base_model=model("BASE"),
                          models=[{"model": model(n), "parameters": params} for n in ("A", "B")])
        path = os.path.join(work, f"{method}{suffix}.yml")
        with open(path, "w") as f:
            yaml.safe_dump(config, f)
        files.append(path)
    return tuple(files)


def timed(cmd: list, nice: int) -> tuple:
    """(wall seconds, peak RSS bytes, CPU seconds: user + system, all threads) of one process run
    under /usr/bin/time -v."""
    proc = subprocess.run(["nice", "-n", str(nice), "/usr/bin/time", "-v", *cmd],
                          capture_output=True, text=True)
    if proc.returncode != 0:  # its own last words come before time's report
        words = proc.stderr.split("\tCommand being timed")[0].strip().splitlines()[-3:]
        raise cli.UserError(f"{' '.join(cmd[-6:])} failed ({proc.returncode}): {' / '.join(words)}")
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", proc.stderr).group(1)
    seconds = sum(float(x) * 60 ** i for i, x in enumerate(reversed(wall.split(":"))))
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1)) * 1024
    cpu = sum(float(re.search(rf"{kind} time \(seconds\): (\S+)", proc.stderr).group(1))
              for kind in ("User", "System"))
    return seconds, rss, cpu


# mergekit-yaml's entry point, run by this interpreter (a console script's #! may name another)
MERGEKIT_YAML = ("import sys; from mergekit.scripts.run_yaml import main; "
                 "sys.argv[0] = 'mergekit-yaml'; sys.exit(main())")


def commands(method: str, configs: tuple, out: str) -> dict:
    return {"ours": [sys.executable, os.path.join(REPO_ROOT, "tools", "merge_checkpoints.py"),
                     "--config", configs[0], "--out", out, "--no-progress"],
            "mergekit": [sys.executable, "-c", MERGEKIT_YAML, configs[1], out + "_hf",
                         "--trust-remote-code", "--random-seed", "0"]}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if not os.access("/usr/bin/time", os.X_OK):
        raise cli.UserError("/usr/bin/time is needed (GNU time: apt-get install time)")
    paths = build_models(os.path.abspath(args.work), args.tokenizer)
    sides = ("ours", "mergekit") if args.side == "both" else (args.side,)
    results = {(m, s): [] for m in args.methods for s in sides}
    loads = []
    out = os.path.join(os.path.abspath(args.work), "merged")
    for run in range(args.runs):
        for method in args.methods:
            cmds = commands(method, write_configs(args.work, paths, method), out)
            for side in sides:
                loads.append(os.getloadavg()[0])
                seconds, rss, cpu = timed(cmds[side], args.nice)
                results[method, side].append((seconds, rss, cpu))
                shutil.rmtree(out, ignore_errors=True)
                shutil.rmtree(out + "_hf", ignore_errors=True)
                print(f"run {run + 1} {method} {side}: {seconds:.1f} s, CPU {cpu:.1f} s, "
                      f"{rss / 2 ** 20:.0f} MiB (load {loads[-1]:.1f})", flush=True)
    mib = 2 ** 20
    print("\n| method | ours: time | mergekit: time | speed-up | ours: CPU | mergekit: CPU | "
          "CPU ratio | ours: peak RSS | mergekit: peak RSS | ours / mergekit RSS | runs |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|")
    for method in args.methods:
        med = {s: [statistics.median(r[i] for r in results[method, s]) for i in range(3)]
               for s in sides}
        ours, theirs = med.get("ours"), med.get("mergekit")
        both = ours and theirs
        cells = [f"{ours[0]:.0f} s" if ours else "", f"{theirs[0]:.0f} s" if theirs else "",
                 f"{theirs[0] / ours[0]:.1f}x" if both else "",
                 f"{ours[2]:.1f} s" if ours else "", f"{theirs[2]:.1f} s" if theirs else "",
                 f"{theirs[2] / ours[2]:.1f}x" if both else "",
                 f"{ours[1] / mib:.0f} MiB" if ours else "",
                 f"{theirs[1] / mib:.0f} MiB" if theirs else "",
                 f"{ours[1] / theirs[1]:.0%}" if both else ""]
        print(f"| {method} | {' | '.join(cells)} | {args.runs} |")
    print(f"\nload average (1 min) between {min(loads):.1f} and {max(loads):.1f}; "
          f"{json.dumps({'runs': args.runs, 'nice': args.nice})}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(PROG, main))
