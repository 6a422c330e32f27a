"""The GPU tools on a CPU machine: scripts/gpu_check.sh (its plan, its clean refusal without CUDA, bad
usage) and tools/bench_train.py (a smoke run of both MoE layers through the trainer, and its refusal
to measure without a GPU)."""
import os
import sys

from conftest import REPO_ROOT, run_cmd

CHECK = os.path.join(REPO_ROOT, "scripts", "gpu_check.sh")
BENCH_TRAIN = os.path.join(REPO_ROOT, "tools", "bench_train.py")


def test_gpu_check_plan_and_refusal_without_cuda(tmp_path):
    env = {"PYTHON": sys.executable, "OUT": str(tmp_path)}
    plan = run_cmd(["bash", CHECK, "--dry-run", "--only", "build,aot,tests,moe,train"], env=env, timeout=120)
    for phase in ("build", "aot", "tests", "moe", "train"):
        assert f"] {phase} (limit " in plan.stdout, plan.stdout
    assert "pip install --no-index --no-build-isolation --no-deps -e ." in plan.stdout
    assert "tools/compile_kernels.py" in plan.stdout
    assert "pytest -m gpu" in plan.stdout and "bench_moe.py --check" in plan.stdout
    assert "dry run: nothing was run" in plan.stdout
    refused = run_cmd(["bash", CHECK, "--only", "env"], env=env, check=False, timeout=120)
    assert refused.returncode == 2, refused.stdout
    assert "no CUDA GPU visible" in refused.stdout and "Traceback" not in refused.stdout
    assert "torch " in refused.stdout and "python " in refused.stdout  # the versions came first
    assert (tmp_path / "gpu_check.log").read_text().count("no CUDA GPU visible") == 1
    # Phases that fail (here: the benchmarks refuse without CUDA) do not stop the later ones; the
    # summary lists them and the exit status is 1.
    proc = run_cmd(["bash", CHECK, "--only", "moe,train", "--budget", "200"], env=env, check=False, timeout=300)
    assert proc.returncode == 1, proc.stdout
    assert "FAILED phases: moe (exit 2) train (exit 2)" in proc.stdout, proc.stdout
    assert (tmp_path / "moe.log").is_file() and (tmp_path / "train.log").is_file()
    for bad in (["--only", "nope"], ["--budget", "5"], ["--frobnicate"]):
        proc = run_cmd(["bash", CHECK, *bad], env=env, check=False, timeout=60)
        assert proc.returncode == 2 and "gpu_check.sh: error:" in proc.stderr, (bad, proc.stderr)


def test_bench_train_smoke_runs_both_moe_layers(tmp_path):
    proc = run_cmd([sys.executable, BENCH_TRAIN, "--smoke", "--data-cache-dir", tmp_path / "cache"], timeout=600)
    out = proc.stdout
    assert "smoke run on CPU" in out, out
    rows = {line.split()[0]: line for line in out.splitlines() if line.startswith(("jai ", "mcore "))}
    assert set(rows) == {"jai", "mcore"}, out
    assert "JaiMoELayer/GroupedExperts" in rows["jai"] and "MoELayer/SequentialMLP" in rows["mcore"], out
    assert "failed" not in out, out
    refused = run_cmd([sys.executable, BENCH_TRAIN], check=False, timeout=120)
    assert refused.returncode == 2 and "CUDA" in refused.stderr and "Traceback" not in refused.stderr
