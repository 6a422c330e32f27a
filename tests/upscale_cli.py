"""Run ``tools/upscale.py`` in the test process (no interpreter start-up per call)."""
from conftest import load_tool, run_tool

upscale_tool = load_tool("upscale")


def upscale(capsys, *args, expect_rc=0):
    """``tools/upscale.py ARGS`` in-process; returns (stdout, stderr); fails on an unexpected rc."""
    return run_tool(capsys, "upscale", *args, expect_rc=expect_rc)
