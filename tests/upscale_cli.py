"""Run ``tools/upscale.py`` in the test process (no interpreter start-up per call)."""
import importlib.util
import os

from conftest import REPO_ROOT

_spec = importlib.util.spec_from_file_location("upscale_tool", os.path.join(REPO_ROOT, "tools", "upscale.py"))
upscale_tool = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(upscale_tool)


def upscale(capsys, *args, expect_rc=0):
    """``tools/upscale.py ARGS`` in-process; returns (stdout, stderr); fails on an unexpected rc."""
    capsys.readouterr()
    rc = upscale_tool.main([str(a) for a in args])
    out, err = capsys.readouterr()
    assert rc == expect_rc, f"upscale.py {' '.join(map(str, args))} returned {rc}\n{out}\n{err}"
    return out, err
