"""Shared test helpers: launching torchrun on CPU (gloo) and locating shared/ data."""
from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("PYTHONWARNINGS", "ignore")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cmd(args, timeout=600, env=None, check=True, cwd=REPO_ROOT) -> subprocess.CompletedProcess:
    """Run a command (list), capture output, and fail the test with its output if it fails."""
    full_env = dict(os.environ)
    full_env.setdefault("OMP_NUM_THREADS", "1")
    full_env["PYTHONPATH"] = REPO_ROOT + os.pathsep + full_env.get("PYTHONPATH", "")
    for var in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK",
                "LOCAL_WORLD_SIZE", "GROUP_RANK", "TORCHELASTIC_RUN_ID"):
        full_env.pop(var, None)  # never inherit a rendezvous from an in-process test
    full_env.update(env or {})
    proc = subprocess.run(args, cwd=cwd, env=full_env, capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        pytest.fail(f"command failed ({proc.returncode}): {' '.join(map(str, args))}\n"
                    f"--- stdout ---\n{proc.stdout[-6000:]}\n--- stderr ---\n{proc.stderr[-6000:]}")
    return proc


def run_python(script, *args, **kw) -> subprocess.CompletedProcess:
    return run_cmd([sys.executable, str(script), *map(str, args)], **kw)


def last_error(proc) -> str:
    """The last stderr line of a command that must have failed with one line, not a traceback."""
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    return lines[-1] if lines else ""


def torchrun(nproc: int, script, *args, **kw) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node nproc script args`` on a free port (CPU, gloo)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           f"--master_port={free_port()}", str(script), *map(str, args)]
    return run_cmd(cmd, **kw)


def load_tool(name: str):
    """``tools/NAME.py`` as a module, to run in-process (no interpreter start-up per call)."""
    spec = importlib.util.spec_from_file_location(f"tool_{name}",
                                                  os.path.join(REPO_ROOT, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_tool(capsys, name: str, *args, expect_rc: int = 0):
    """``tools/NAME.py ARGS`` in-process through ``cli.run`` (the exit codes and one-line errors
    of the real command line); returns (stdout, stderr); fails on an unexpected exit code."""
    from megatron_jai import cli

    capsys.readouterr()
    rc = cli.run(f"{name}.py", load_tool(name).main, [str(a) for a in args])
    out, err = capsys.readouterr()
    assert rc == expect_rc, f"{name}.py {' '.join(map(str, args))} returned {rc}\n{out}\n{err}"
    return out, err


@pytest.fixture(scope="session")
def shared_dir():
    from megatron_jai.paths import shared_dir as _shared

    d = _shared()
    if not os.path.isdir(d):
        pytest.skip(f"shared data directory {d} not found (set JAI_SHARED_DIR)")
    return d


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` need CUDA: skipped where torch sees no GPU (scripts/gpu_check.sh runs them)."""
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu_items:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (scripts/gpu_check.sh runs the gpu tests)")
    for item in gpu_items:
        item.add_marker(skip)
