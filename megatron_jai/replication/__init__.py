"""The JAI recipe, whole, as one rerunnable chain (``tools/replicate.py``): a small English base
model stands in for Phi-3-medium; the chain grows it the JAI-1 way (tokenizer extension, DUS.v2,
MoE upcycling from snapshots), pretrains it in three phases against two controls, post-trains it
(SFT A and B, merge, DPO), exports and evaluates every stage's model, and writes the report.

It sits on the top floor with ``tools/`` and the entry scripts, which it drives: every stage is a
call of their ``main(argv)`` (:mod:`.runner`), so no stage exists twice. :mod:`.scales` holds the
sizes, :mod:`.chain` the stages, :mod:`.report` the checks, hypotheses, tables and plots.
"""
from __future__ import annotations

import json
import os
import subprocess
import time

from megatron_jai.cli import UserError
from megatron_jai.paths import REPO_ROOT

RUN_FILE = "run.json"


def start_run(out: str, scale, seed: int, command: str) -> dict:
    """``OUT/run.json`` of a new run, or the one of the run ``OUT`` holds, which must be of the
    same scale and seed (a rerun continues it). Refuses a folder that holds anything else."""
    path = os.path.join(out, RUN_FILE)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            run = json.load(f)
        if (run["scale"]["name"], run["seed"]) != (scale.name, seed):
            raise UserError(f"{out} holds a --scale {run['scale']['name']} --seed {run['seed']} "
                            f"run; rerun it with those, or choose another --out")
        if run["scale"] != json.loads(json.dumps(scale.to_dict())):
            raise UserError(f"{out} was started with other {scale.name} sizes (an older version of "
                            f"this tool?); choose another --out")
        return run
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise UserError(f"--out {out} exists and is not a replication run (no {RUN_FILE}); "
                        f"choose a new or empty folder")
    os.makedirs(out, exist_ok=True)
    run = {"scale": scale.to_dict(), "seed": seed, "commit": git_commit(), "started": time.time(),
           "command": command}
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(run, f, indent=1)
    os.replace(path + ".tmp", path)
    return run


def git_commit() -> str:
    try:
        return subprocess.run(["git", "-C", REPO_ROOT, "rev-parse", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def replicate(scale_name: str, out: str, seed: int, threads: int, command: str,
              stream=None) -> int:
    """Run (or continue) the chain in ``out`` with ``threads`` torch threads, then write the
    report; returns the exit status (1 when a function-preservation check fails)."""
    import sys

    import torch

    from megatron_jai.replication.chain import Chain
    from megatron_jai.replication.report import write_report
    from megatron_jai.replication.runner import StageRunner
    from megatron_jai.replication.scales import SCALES

    stream = stream or sys.stdout
    scale = SCALES[scale_name]
    out = os.path.abspath(out)
    run = start_run(out, scale, seed, command)
    torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)  # the tools' worker processes
    runner = StageRunner(out, stream)
    t0 = time.time()
    runner.run_all(Chain(scale, out, seed, runner).stages())
    report = write_report(out, run, runner, stream)
    print(f"replicate: {scale.name} run in {out}: {len(runner.rows)} stages "
          f"({sum(r[1] == 'ran' for r in runner.rows)} ran now in {time.time() - t0:.0f} s, "
          f"{report['wall_seconds']:.0f} s of stages in all); checks "
          f"{sum(c['passed'] for c in report['checks'])}/{len(report['checks'])} passed; "
          f"report {os.path.join(out, 'report.md')}", file=stream, flush=True)
    return 0 if all(c["passed"] for c in report["checks"]) else 1
