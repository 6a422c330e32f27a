"""The command-line convention shared by every tool (megatron_jai/cli.py): bad input is one line on
stderr and exit 2; data-only tools start without importing Megatron-Core."""
import ast
import json
import os
import re
import sys

import pytest

from conftest import REPO_ROOT, run_cmd, run_tool
from megatron_jai import cli

# (tool, arguments with a bad input, expected fragment of the one error line)
BAD_INPUTS = [
    ("convert_checkpoint", ["hf-to-mcore", "--hf-dir", "{tmp}/missing", "--out", "{tmp}/out"],
     "missing"),
    ("compare_logits", ["--hf-dir", "{tmp}/missing", "--mcore-dir", "{tmp}/missing2"], "missing"),
    ("preprocess_data", ["--input", "{tmp}/missing.jsonl", "--output-prefix", "{tmp}/out",
                         "--tokenizer", "{tmp}"], "does not exist"),
    ("train_tokenizer", ["--input", "{tmp}/missing.jsonl", "--vocab-size", "500", "--out",
                         "{tmp}/out"], "no such file"),
    ("extend_tokenizer", ["--base", "{tmp}", "--add", "{tmp}/missing", "--target-vocab", "100",
                          "--out", "{tmp}/out"], "no tokenizer.model"),
    ("tokens_per_char", ["--tokenizer", "{tmp}", "--text", "{tmp}/missing.txt"], "no such file"),
    ("plot_training", ["{tmp}/missing.jsonl", "--out", "{tmp}/out.png"], "does not exist"),
    ("upscale", ["dus", "--in", "{tmp}/missing", "--out", "{tmp}/out"], "does not exist"),
    ("upscale", ["recipe", "jai", "--in", "{tmp}/missing", "--tokenizer", "{tmp}", "--out",
                 "{tmp}/out"], "does not exist"),
]


@pytest.mark.parametrize("tool,args,fragment", BAD_INPUTS,
                         ids=[f"{t}-{a[0]}" for t, a, _ in BAD_INPUTS])
def test_bad_input_is_one_line_and_exit_2(tool, args, fragment, tmp_path, capsys):
    args = [a.format(tmp=tmp_path) for a in args]
    out, err = run_tool(capsys, tool, *args, expect_rc=2)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{tool}.py: error: "), err
    assert fragment in lines[0], lines[0]
    assert os.listdir(tmp_path) == [], "bad input wrote something"


def test_every_error_type_is_a_user_error_listed_in_developers_md():
    """Every exception class of the package derives from UserError (one line, exit 2), and
    DEVELOPERS.md names them all."""
    import importlib

    from megatron_jai.cli import UserError

    found = {}
    for directory, _, files in os.walk(os.path.join(REPO_ROOT, "megatron_jai")):
        for name in (f for f in files if f.endswith(".py")):
            path = os.path.join(directory, name)
            with open(path, encoding="utf-8") as f:
                tree = ast.parse(f.read())
            module = os.path.relpath(path[:-3], REPO_ROOT).replace(os.sep, ".")
            found.update({c.name: module for c in tree.body
                          if isinstance(c, ast.ClassDef) and c.name.endswith("Error")})
    assert len(found) > 10, found
    for cls, module in found.items():
        assert issubclass(getattr(importlib.import_module(module), cls), UserError), cls
    with open(os.path.join(REPO_ROOT, "DEVELOPERS.md"), encoding="utf-8") as f:
        listed = set(re.findall(r"`(\w+Error)`", f.read()))
    assert sorted(set(found) - listed - {"UserError"}) == []


_DATA_TOOLS_SCRIPT = r"""
import json, os, runpy, sys
tmp, tokenizer = sys.argv[1], sys.argv[2]

# imports point down: the presets know no DUS plan (the plans take their layout from the presets)
import megatron_jai.presets
assert "megatron_jai.upscale.plan" not in sys.modules, "the presets import the DUS plans"
import megatron_jai.upscale.plan as plan
plan.get_plan("phi3-medium-jai")

def tool(name, *args):
    sys.argv = [name, *args]
    try:
        runpy.run_path(os.path.join("tools", name), run_name="__main__")
    except SystemExit as e:
        assert not e.code, (name, e.code)

with open(os.path.join(tmp, "docs.jsonl"), "w") as f:
    f.write('{"text": "hello world"}\n{"text": "a second document"}\n')
tool("preprocess_data.py", "--input", os.path.join(tmp, "docs.jsonl"), "--output-prefix",
     os.path.join(tmp, "docs"), "--tokenizer", tokenizer, "--workers", "1", "--no-progress")

import torch
from megatron_jai.checkpoint.stream import CheckpointWriter
from megatron_jai.presets import TINY
cfg = TINY.replace(num_layers=2)
with CheckpointWriter(os.path.join(tmp, "base"), cfg) as w:
    w.write("embedding.word_embeddings.weight", torch.zeros(cfg.padded_vocab_size, 64))
    for i in range(2):
        w.write_layer("decoder.layers.mlp.linear_fc1.weight", i, 2, torch.full((320, 64), i))
with open(os.path.join(tmp, "plan.json"), "w") as f:
    json.dump({"block_size": 1, "multiplicities": [1, 2]}, f)
tool("upscale.py", "dus", "--in", os.path.join(tmp, "base"), "--plan",
     os.path.join(tmp, "plan.json"), "--out", os.path.join(tmp, "dus"))
print("MEGATRON", sorted(m for m in sys.modules if m.startswith("megatron.")))
"""


def test_data_tools_do_not_import_megatron_core(tmp_path):
    """preprocess_data.py and upscale.py do their work without Megatron-Core's package import
    (its optimizer, DDP, FSDP: seconds of start-up), and what they write is Megatron's format."""
    from megatron.core.dist_checkpointing.core import CheckpointingConfig

    from megatron_jai.data.demo import ensure_demo_data

    tokenizer = ensure_demo_data().tokenizer_path
    proc = run_cmd([sys.executable, "-c", _DATA_TOOLS_SCRIPT, tmp_path, tokenizer])
    assert proc.stdout.strip().splitlines()[-1] == "MEGATRON []", proc.stdout
    with open(tmp_path / "dus" / "iter_0000000" / "metadata.json") as f:
        assert json.load(f) == CheckpointingConfig("torch_dist").__dict__


def test_progress_bar_on_a_terminal_plain_lines_in_a_log(tmp_path, capsys, monkeypatch):
    from megatron_jai.data.demo import ensure_demo_data

    text = tmp_path / "t.txt"
    text.write_text("hello world\nanother line\n")
    tok = ensure_demo_data().tokenizer_path
    args = ("--tokenizer", tok, "--tokenizer", tok, "--text", text)
    # stderr is a log (captured): no bar, no carriage return; short work prints no line either
    out, err = run_tool(capsys, "tokens_per_char", *args)
    assert err == "", err
    assert out.strip().endswith("tokens_per_char: 2 tokenizers x 1 texts (2 lines)")
    # a terminal: the bar, counting tokenizers
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    out, err = run_tool(capsys, "tokens_per_char", *args)
    assert "2/2" in err and (" tokenizer/s" in err or "s/ tokenizer" in err), err
    assert "tok/s" not in err
    # a log of long work: one plain line per interval
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    with cli.progress(total=4, desc="reference log-probs", unit="batch", log_interval=0) as bar:
        bar.update(1)
        bar.update(3)
    assert [line.split(", ")[0] for line in capsys.readouterr().err.splitlines()] == \
        ["reference log-probs: 1/4 batch (25%)", "reference log-probs: 4/4 batch (100%)"]
    assert list(cli.progress(range(3), enabled=False)) == [0, 1, 2]
