"""The MoE layer (EP=1) against the whole-MoE-FFN reference, inside a GPTModel, and on the Triton
kernels. The checks run in subprocesses (they initialise torch.distributed)."""
import os

from conftest import REPO_ROOT, run_python

SCRIPT = os.path.join(REPO_ROOT, "tests", "dist", "moe_layer_check.py")


def test_layer_matches_reference_and_fills_the_model_mlp_slots():
    out = run_python(SCRIPT, "reference", "model", timeout=300)
    assert "OK reference" in out.stdout and "OK model" in out.stdout, out.stdout


def test_layer_runs_on_triton_kernels_in_interpreter():
    out = run_python(SCRIPT, "triton", timeout=300, env={"TRITON_INTERPRET": "1"})
    assert "OK triton" in out.stdout
