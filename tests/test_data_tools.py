"""tools/plot_training.py, the scale-out files (Slurm script, Dockerfile) and the memory arithmetic."""
import json
import math
import os
import re
import stat
import sys

import pytest

from conftest import REPO_ROOT, run_cmd
from megatron_jai.presets import JAI_75B, PRESETS
from megatron_jai.training.memory_estimate import GiB, check_layout, estimate

PLOT = os.path.join(REPO_ROOT, "tools", "plot_training.py")
SBATCH = os.path.join(REPO_ROOT, "examples", "slurm", "pretrain_jai_75b.sbatch")
ESTIMATE = os.path.join(REPO_ROOT, "examples", "slurm", "estimate_memory.py")


# ---- plot_training -------------------------------------------------------------------------------
def _metrics_file(path, steps=60):
    with open(path, "w") as f:
        for s in range(1, steps + 1):
            rec = {"step": s, "phase": "english" if s <= steps // 2 else "thai",
                   "loss": 7 * math.exp(-s / 20) + 1.5, "lr": 1e-3 * min(1, s / 5),
                   "grad_norm": 1.0 + 0.01 * s, "tokens_per_s": 4000.0 + s,
                   "tflops_per_gpu": 0.01, "skipped": s == 7}
            if s > steps // 2:
                rec["loss/thai"] = rec["loss"] + 0.2
            f.write(json.dumps(rec) + "\n")
        f.write('{"step": 61, "loss": 1.')  # a line cut short by a kill


def test_plot_training_png(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    _metrics_file(metrics)
    out = tmp_path / "plots" / "loss.png"
    proc = run_cmd([sys.executable, PLOT, str(metrics), str(metrics), "--out", str(out),
                    "--smooth", "3"])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 20_000
    first, last = 7 * math.exp(-1 / 20) + 1.5, 7 * math.exp(-3) + 1.5
    assert f"steps 1-60 (60 records), loss {first:.3f} -> {last:.3f}" in proc.stdout
    assert "skipped 1 unreadable lines" in proc.stderr
    assert proc.stdout.strip().endswith(f"wrote {out}")


def test_plot_training_bad_input(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"step": 1, "accuracy": 0.5}\n')
    all_nan = tmp_path / "nan.jsonl"  # every step skipped: nothing to plot or summarise
    all_nan.write_text('{"step": 1, "loss": NaN, "lr": 0.1, "grad_norm": NaN, '
                       '"tokens_per_s": 10.0, "skipped": true}\n')
    for args in ([str(tmp_path / "missing.jsonl")], [str(bad)], [str(all_nan)]):
        proc = run_cmd([sys.executable, PLOT, *args, "--out", str(tmp_path / "x.png")],
                       check=False)
        assert proc.returncode == 2 and proc.stderr.startswith("plot_training.py: error: ")
        assert "Traceback" not in proc.stderr
    assert not os.path.exists(tmp_path / "x.png")


def _record(step, **extra):
    return {"step": step, "loss": 5.0 - 0.01 * step, "lr": 1e-3, "grad_norm": 1.0,
            "tokens_per_s": 1000.0, **extra}


def test_metrics_mark_resumes_and_router_stats_on_step_lines(tmp_path, capsys):
    """A resumed run cuts the file back to its checkpoint and marks its first record; MoE step
    lines carry a router summary; the plot draws a router panel, marks resume points, and keeps
    the newest line of descent when steps go back in an uncut file (a roll-back)."""
    from megatron_jai.training.metrics import MetricsLogger, format_record
    from megatron_jai.training.plots import plot_runs, read_metrics, summarize

    router = {"moe/aux_loss": 0.0102, "moe/z_loss": 0.001, "moe/entropy": 1.3801,
              "moe/dropped_fraction": 0.0125, "moe/max_load": 1.2345}
    line = format_record(_record(1, phase="p", **router))
    assert line.endswith("| router load max 1.23x entropy 1.380 dropped 1.2%"), line
    assert "router" not in format_record(_record(1, phase="p"))

    path = tmp_path / "m.jsonl"
    logger = MetricsLogger(True, metrics_file=str(path))
    for step in range(1, 7):
        logger.log(_record(step, **router))
    logger.close()
    logger = MetricsLogger(True, metrics_file=str(path), resume_step=4)  # steps 5, 6 were lost
    for step in (5, 6, 7):
        logger.log(_record(step, **router))
    logger.close()
    records = [json.loads(x) for x in path.read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 8))  # every line is still a step record
    assert [r.get("resumed_from") for r in records] == [None] * 4 + [4, None, None]
    run = read_metrics(str(path))
    assert run.resumes == [4] and summarize(run).endswith("resumed at step 4")

    # a roll-back written into an uncut file: 1..6, then again from 3 (resumed at 2) to 4
    uncut = tmp_path / "uncut.jsonl"
    steps = [1, 2, 3, 4, 5, 6, 3, 4]
    uncut.write_text("".join(json.dumps(_record(s, resumed_from=2) if i == 6 else _record(s)) + "\n"
                             for i, s in enumerate(steps)))
    rolled = read_metrics(str(uncut))
    assert [r["step"] for r in rolled.records] == [1, 2, 3, 4] and rolled.resumes == [2]
    capsys.readouterr()
    assert plot_runs([run, rolled], str(tmp_path / "p.png")) == \
        ["loss", "throughput", "lr", "router"]
    assert plot_runs([rolled], str(tmp_path / "dense.png")) == ["loss", "throughput", "lr"]
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


# ---- memory arithmetic ---------------------------------------------------------------------------
def test_memory_estimate_accounts_for_every_parameter():
    # one pipeline stage holding the whole model: the distinct shards of the TP x EP grid add up
    # to the model's parameter count (plus the vocabulary padding)
    for cfg, tp, ep in [(JAI_75B, 2, 4), (JAI_75B, 1, 1), (JAI_75B, 5, 2),
                        (PRESETS["phi3-medium"], 2, 1), (PRESETS["tiny-moe"], 2, 2)]:
        est = estimate(cfg, world=tp * ep, tp=tp, pp=1, ep=ep)
        h = cfg.hidden_size
        replicated = cfg.num_layers * (2 * h + h * cfg.num_experts) + h  # norms, routers
        dense_sharded = est.params - est.expert_params - replicated
        distinct = dense_sharded * tp + replicated + est.expert_params * tp * max(ep, 1)
        padding = 2 * (cfg.padded_vocab_size - cfg.vocab_size) * h
        assert distinct == cfg.parameter_counts()["total"] + padding, (cfg.name, tp, ep)


def test_chosen_75b_layout_fits_and_others_do_not():
    chosen = estimate(JAI_75B, 64, tp=2, pp=8, ep=4, seq_length=4096, recompute="none")
    assert chosen.params < 1.6e9 and chosen.edp == 1 and chosen.dp == 4
    assert chosen.total < 80 * GiB
    # phase 3 (32K tokens) only fits with full recompute
    long = {r: estimate(JAI_75B, 64, 2, 8, 4, seq_length=32768, recompute=r).total
            for r in ("none", "selective", "full")}
    assert long["none"] > long["selective"] > 80 * GiB > long["full"]
    # recompute never changes the model states, only activations
    sel = estimate(JAI_75B, 64, 2, 8, 4, recompute="selective")
    assert (sel.weights, sel.optimizer) == (chosen.weights, chosen.optimizer)
    assert sel.activations < chosen.activations
    # no model parallelism at all: the Adam states alone exceed a GPU
    assert estimate(JAI_75B, 64, 1, 1, 1, distributed_optimizer=False).total > 80 * GiB
    for world, tp, pp, ep, msg in [(64, 4, 8, 2, "KV heads"), (96, 2, 3, 4, "PP=3"),
                                   (50, 2, 3, 4, "TP\\*PP"), (64, 2, 8, 3, "EP=3"),
                                   (64, 2, 16, 4, "ETP\\*EP")]:
        with pytest.raises(ValueError, match=msg):
            check_layout(JAI_75B, world, tp, pp, ep)


def test_estimate_memory_cli(capsys):
    import runpy

    cli = runpy.run_path(ESTIMATE, run_name="estimate_memory")  # in-process: no torch re-import
    assert cli["main"](["--nodes", "8", "--tp", "2", "--pp", "8", "--ep", "4",
                        "--recompute", "full"]) == 0
    assert re.search(r"estimated [\d.]+ GiB per GPU: fits in 80 GiB", capsys.readouterr().out)
    assert cli["main"](["--nodes", "8", "--compare"]) == 0
    table = capsys.readouterr().out
    assert "| 2 | 8 | 4 | 4 | 1 |" in table and "not buildable" in table
    assert cli["main"](["--nodes", "8", "--tp", "4"]) == 1
    assert capsys.readouterr().err.startswith("error: TP=4 does not divide")


# ---- Slurm ---------------------------------------------------------------------------------------
def _fake_slurm(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/bin/bash\nprintf "%s\\n" "$@" > "$FAKE_SRUN_OUT"\n')
    (bin_dir / "scontrol").write_text(
        '#!/bin/bash\n[ "$1 $2" = "show hostnames" ] && printf "node-17\\nnode-18\\n"\n')
    for f in bin_dir.iterdir():
        f.chmod(f.stat().st_mode | stat.S_IEXEC)
    return bin_dir


def _toy_config(tmp_path):
    """A run config of a 64-layer MoE the size of a toy: the 75B's layouts pass the script's dry
    run in seconds."""
    from megatron_jai.presets import TINY_MOE

    TINY_MOE.replace(name="toy-64", num_layers=64).save(str(tmp_path / "toy64.json"))
    config = tmp_path / "jai.yaml"
    config.write_text("model: toy64.json\nseq_length: 4096\nmicro_batch_size: 1\n"
                      "global_batch_size: 64\n")
    return config


def _run_sbatch(tmp_path, nodes, *args, config=None, **env):
    bin_dir = _fake_slurm(tmp_path) if not (tmp_path / "bin").exists() else tmp_path / "bin"
    config = config or _toy_config(tmp_path)
    out = tmp_path / "srun_args.txt"
    if out.exists():
        out.unlink()
    full_env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SLURM_NNODES": str(nodes),
                "SLURM_JOB_NODELIST": f"node-[17-{16 + nodes}]", "SLURM_JOB_ID": "4242",
                "FAKE_SRUN_OUT": str(out), "CONFIG": str(config), "RUN_DIR": str(tmp_path / "run"),
                "JAI_REPO": REPO_ROOT, "PYTHON": sys.executable,
                "DRY_RUN_ARGS": "--no-file-checks", **env}
    proc = run_cmd(["bash", SBATCH, *args], env=full_env, check=False)
    argv = out.read_text().splitlines() if out.exists() else None
    return proc, argv


def test_sbatch_launches_multinode_torchrun(tmp_path):
    proc, argv = _run_sbatch(tmp_path, 8, "--train-iters", "3", INIT_FROM="/ckpt/upscaled")
    assert proc.returncode == 0, proc.stderr
    torchrun = argv[argv.index("torchrun"):]
    joined = " ".join(torchrun)
    assert "--nnodes 8 --nproc-per-node 8 --rdzv-backend c10d" in joined
    assert "--rdzv-endpoint node-17:29500 --rdzv-id 4242" in joined
    script = torchrun.index(os.path.join(REPO_ROOT, "pretrain_jai.py"))
    train_args = torchrun[script + 1:]
    assert " ".join(train_args[train_args.index("--tp"):][:6]) == "--tp 2 --pp 8 --ep 4"
    assert train_args[-4:] == ["--init-from", "/ckpt/upscaled", "--train-iters", "3"]
    assert "DP=4" in proc.stdout
    # the flags are pretrain_jai.py's own (when TRAIN's parser and the 75B config are there)
    real_config = os.path.join(REPO_ROOT, "examples", "jai_75b.yaml")
    try:
        from megatron_jai.training.arguments import parse_args
    except ImportError:
        parse_args = None
    if parse_args is not None and os.path.isfile(real_config):
        _, argv = _run_sbatch(tmp_path, 8, config=real_config)
        torchrun = argv[argv.index("torchrun"):]
        parsed = parse_args(torchrun[torchrun.index(os.path.join(REPO_ROOT, "pretrain_jai.py")) + 1:])
        assert (parsed.tp, parsed.pp, parsed.ep) == (2, 8, 4)
        assert parsed.save == parsed.load == str(tmp_path / "run" / "checkpoints")


def test_sbatch_rejects_impossible_layouts(tmp_path):
    for nodes, env, msg in [(3, {}, "not a multiple of TP\\*PP"),
                            (4, {"PP": "4", "EP": "4", "TP": "2"}, None),
                            (2, {"PP": "1", "TP": "2", "EP": "4"}, None),
                            (4, {"PP": "8", "TP": "2", "EP": "4"}, "world/PP = 4")]:
        proc, argv = _run_sbatch(tmp_path, nodes, **env)
        if msg is None:
            assert proc.returncode == 0, (nodes, env, proc.stdout, proc.stderr)
        else:
            assert proc.returncode == 1 and re.search(msg, proc.stderr), proc.stderr
            assert argv is None  # nothing was launched



def test_sbatch_time_limit_checkpoints_and_requeues(tmp_path):
    """Slurm's USR1 before the time limit: the script sends SIGTERM to srun (the run checkpoints
    and exits 0) and then requeues the job; a run that ends on its own is not requeued."""
    import signal
    import subprocess
    import time

    bin_dir = _fake_slurm(tmp_path)
    log = tmp_path / "log"
    (bin_dir / "srun").write_text(
        '#!/bin/bash\ntrap \'echo srun-got-TERM >> "$LOG"; exit 0\' TERM\n'
        'echo started > "$FAKE_SRUN_OUT"\nfor i in $(seq 300); do sleep 0.1; done\n'
        'echo srun-finished >> "$LOG"\n')
    (bin_dir / "scontrol").write_text(
        '#!/bin/bash\nif [ "$1 $2" = "show hostnames" ]; then printf "node-17\\n"; '
        'else echo "scontrol $*" >> "$LOG"; fi\n')
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
           "SLURM_NNODES": "8", "SLURM_JOB_NODELIST": "node-17", "SLURM_JOB_ID": "4242",
           "FAKE_SRUN_OUT": str(tmp_path / "started"), "LOG": str(log),
           "CONFIG": str(_toy_config(tmp_path)), "RUN_DIR": str(tmp_path / "run"),
           "JAI_REPO": REPO_ROOT, "PYTHON": sys.executable, "DRY_RUN_ARGS": "--no-file-checks"}
    proc = subprocess.Popen(["bash", SBATCH], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120  # the dry run comes first
    while not (tmp_path / "started").exists() and time.time() < deadline:
        time.sleep(0.05)
    assert (tmp_path / "started").exists(), "srun was not launched"
    proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, (out, err)
    assert log.read_text().splitlines() == ["srun-got-TERM", "scontrol requeue 4242"], err


# ---- Dockerfile ----------------------------------------------------------------------------------
def test_dockerfile_installs_every_runtime_dependency():
    text = open(os.path.join(REPO_ROOT, "Dockerfile")).read()
    assert re.search(r"^ARG BASE_IMAGE=nvcr\.io/nvidia/pytorch:\S+-py3$", text, re.M)
    assert "pip install --no-cache-dir --no-build-isolation --no-deps -e ." in text
    selected = set(re.search(r"grep -E '\^\(([^)]*)\)==", text).group(1).split("|"))
    pinned = {line.split("==")[0] for line in open(os.path.join(REPO_ROOT, "requirements-cpu.txt"))
              if "==" in line and not line.startswith("#")}
    # everything pinned for CPU is installed, except what the NGC image builds for CUDA itself
    assert pinned - selected == {"torch", "triton", "numpy"}
    assert selected <= pinned
