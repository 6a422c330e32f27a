"""tools/replicate.py: the whole JAI recipe as one chain (base model -> tokenizer extension -> DUS
-> MoE from snapshots -> three phases, two controls -> SFT A/B -> merge -> DPO -> export and
evaluation), at the smoke scale."""
import json
import os
import re
import sys

from conftest import REPO_ROOT, run_cmd, run_tool

REPLICATE = os.path.join(REPO_ROOT, "tools", "replicate.py")
STAGE_MODELS = ("base", "vocab", "dus", "jai-english-s1", "moe-one-snapshot", "jai-moe-s1",
                "jai-thai-s1", "jai-s1", "control-a-s1", "control-b-s1", "jai-s2", "control-a-s2",
                "control-b-s2", "sft-a", "sft-b", "merge", "dpo")
TEXTS = {"thai_valid", "english_valid", "ntrex_tha", "ntrex_eng"}


def test_jai_plan_scaled_to_ten_layers():
    """10 -> 16 layers with JAI-1's skips (Phi-3-medium's 40 -> 64 plan, blocks of 4 -> 1)."""
    from megatron_jai.replication.scales import SMALL, SMOKE, dus_plan, phases
    from megatron_jai.upscale.plan import get_plan, plan_from_dict

    plan = plan_from_dict(dus_plan(SMOKE))
    jai = get_plan("phi3-medium-jai")
    assert (plan.base_layers, plan.num_layers) == (10, 16)
    assert [(4 * s.source, 4 * s.target, s.alpha_train, s.alpha_infer) for s in plan.skip_connections] \
        == [(s.source, s.target, s.alpha_train, s.alpha_infer) for s in jai.skip_connections]
    for scale in (SMOKE, SMALL):  # every phase step holds the same tokens; phase 3 at 4x the context
        p = phases(scale)
        assert [x.get("global_batch_size", scale.batch) * x["seq_length"] for x in p] == \
            [scale.batch * scale.seq] * 3
        assert p[2]["seq_length"] == 4 * scale.seq and p[2]["rotary_base"] > 10_000
        assert p[1]["blend"] == p[2]["blend"] == {"english": 0.73, "thai": 0.27}


def test_smoke_chain(tmp_path, shared_dir, capsys):
    out = tmp_path / "smoke"
    proc = run_cmd([sys.executable, REPLICATE, "--scale", "smoke", "--out", out], timeout=1200)
    stage_lines = [line for line in proc.stdout.splitlines() if re.match(r"\[\s*\d+/\d+\] ", line)]
    assert stage_lines and all(re.search(r"\(\d+\.\d s\)$", line) for line in stage_lines), \
        proc.stdout
    report = json.loads((out / "report.json").read_text())
    assert [c["name"][:20] for c in report["checks"]] == [
        "tokenizer extension ", "MoE upcycling with e", "the final checkpoint"]
    assert all(c["passed"] for c in report["checks"]), report["checks"]
    assert [h["id"] for h in report["hypotheses"]] == [f"H{i}" for i in range(1, 8)]
    assert all(isinstance(h["holds"], bool) and h["measured"] for h in report["hypotheses"])
    for name in STAGE_MODELS:  # every stage produced a model, exported and evaluated
        hf = out / ("final_hf" if name == "dpo" else os.path.join("hf", name))
        assert (hf / "config.json").is_file(), name
        assert set(report["models"][name]) == TEXTS, name
    assert report["final"]["bits_per_char"]["ntrex_tha"] > 0
    assert {p["arm"] for p in report["curves"]} == {"jai", "control-a", "control-b"}
    for image in ("replication_bits_per_char.png", "replication_expert_load.png"):
        assert (out / "images" / image).stat().st_size > 10_000
        assert f"](images/{image})" in (out / "report.md").read_text()
    assert "checks 3/3 passed" in proc.stdout.splitlines()[-1]

    # the final export is a transformers model that chats
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out / "final_hf", trust_remote_code=True)
    tok = AutoTokenizer.from_pretrained(out / "final_hf", trust_remote_code=True)
    chat = tok.apply_chat_template([{"role": "user", "content": "สวัสดี"}],
                                   add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        ids = model.generate(**chat, max_new_tokens=3, do_sample=False)
    assert ids.shape[1] > chat["input_ids"].shape[1]

    # a rerun keeps every finished stage; another seed in the same folder is refused
    again = run_cmd([sys.executable, REPLICATE, "--scale", "smoke", "--out", out], timeout=300)
    kept = [line for line in again.stdout.splitlines() if re.match(r"\[\s*\d+/\d+\] ", line)]
    assert len(kept) == len(stage_lines) and all(": kept (" in line for line in kept)
    assert json.loads((out / "report.json").read_text())["checks"] == report["checks"]
    err = run_tool(capsys, "replicate", "--scale", "smoke", "--out", out, "--seed", 5,
                   expect_rc=2)[1]
    assert "holds a --scale smoke --seed 1 run" in err and len(err.strip().splitlines()) == 1


def test_refuses_a_folder_that_is_not_a_run(tmp_path, capsys):
    (tmp_path / "data.txt").write_text("a user's file")
    err = run_tool(capsys, "replicate", "--scale", "smoke", "--out", tmp_path, expect_rc=2)[1]
    assert "is not a replication run" in err
    assert os.listdir(tmp_path) == ["data.txt"]
