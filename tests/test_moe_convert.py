"""MoE checkpoints <-> Hugging Face Mixtral: conversion with EP, logits against transformers at EP=1
and EP=2, a bit-identical round trip, and bad input."""
import json
import os
import sys

import pytest
import torch

from conftest import REPO_ROOT, run_cmd, run_python, torchrun
from export_helpers import tiny_tokenizer

CONVERT = os.path.join(REPO_ROOT, "tools", "convert_checkpoint.py")
COMPARE = os.path.join(REPO_ROOT, "tools", "compare_logits.py")
EXPERTS, LAYERS, HIDDEN, FFN = 4, 2, 32, 24


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    """A random tiny MixtralForCausalLM (GQA, 4 experts top-2, vocab not a multiple of 128), saved
    with save_pretrained, and its conversion (validated for EP=2)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    root = tmp_path_factory.mktemp("mixtral")
    config = MixtralConfig(vocab_size=200, hidden_size=HIDDEN, intermediate_size=FFN,
                           num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
                           num_local_experts=EXPERTS, num_experts_per_tok=2,
                           max_position_embeddings=128, initializer_range=0.15)
    torch.manual_seed(0)
    MixtralForCausalLM(config).save_pretrained(root / "hf")
    out = run_python(CONVERT, "hf-to-mcore", "--hf-dir", root / "hf", "--out", root / "mcore",
                     "--ep", "2", "--no-progress")
    assert "hf-to-mcore:" in out.stdout.strip().splitlines()[-1]
    return root


def _last_line_diff(proc) -> float:
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("max_abs_logit_diff "), proc.stdout
    return float(last.split()[1])


def test_mixtral_converts_to_our_keys_and_config(mixtral):
    from megatron_jai.checkpoint.stream import CheckpointReader

    reader = CheckpointReader(str(mixtral / "mcore"))
    cfg = reader.config
    assert (cfg.num_experts, cfg.moe_top_k, cfg.moe_normalize_topk) == (EXPERTS, 2, True)
    assert cfg.expert_ffn_hidden_size == FFN and cfg.num_query_groups == 2
    assert tuple(reader.shape("decoder.layers.mlp.experts.weight_gate_up")) == (LAYERS, EXPERTS, 2 * FFN, HIDDEN)
    assert tuple(reader.shape("decoder.layers.mlp.experts.weight_down")) == (LAYERS, EXPERTS, HIDDEN, FFN)
    assert tuple(reader.shape("decoder.layers.mlp.router.weight")) == (LAYERS, EXPERTS, HIDDEN)
    from safetensors import safe_open

    with safe_open(str(mixtral / "hf" / "model.safetensors"), "pt") as f:
        w1 = f.get_tensor("model.layers.1.block_sparse_moe.experts.2.w1.weight")
        w3 = f.get_tensor("model.layers.1.block_sparse_moe.experts.2.w3.weight")
        w2 = f.get_tensor("model.layers.1.block_sparse_moe.experts.2.w2.weight")
    gate_up = reader.read_layer("decoder.layers.mlp.experts.weight_gate_up", 1)[2]
    assert torch.equal(gate_up, torch.cat([w1, w3]))  # rows [gate; up]
    assert torch.equal(reader.read_layer("decoder.layers.mlp.experts.weight_down", 1)[2], w2)


@pytest.mark.dist
def test_mixtral_logits_match_at_ep1_ep2_and_tp2(mixtral):
    args = ["--hf-dir", mixtral / "hf", "--mcore-dir", mixtral / "mcore", "--seq-len", "24"]
    ep1 = run_python(COMPARE, *args, timeout=300)
    ep2 = torchrun(2, COMPARE, *args, "--ep", "2", timeout=300)
    tp2 = torchrun(2, COMPARE, *args, "--tp", "2", timeout=300)  # experts split along F
    for proc, ep in ((ep1, 1), (ep2, 2), (tp2, 1)):
        assert f"EP={ep}: within tolerance" in proc.stdout, proc.stdout
        assert _last_line_diff(proc) < 1e-4
    assert "TP=2" in tp2.stdout, tp2.stdout
    summary = ep1.stdout.strip().splitlines()[-2]
    max_logit = float(summary.split("max |logit| ")[1].split(",")[0])
    assert max_logit > 1.0, summary  # logits large enough for the comparison to mean something


def test_mixtral_round_trip_is_bit_identical(mixtral, tmp_path):
    from safetensors import safe_open

    run_python(CONVERT, "mcore-to-hf", "--mcore-dir", mixtral / "mcore", "--out", tmp_path / "hf2",
               "--no-progress", "--tokenizer", tiny_tokenizer(str(tmp_path / "tok")))
    with open(mixtral / "hf" / "config.json") as a, open(tmp_path / "hf2" / "config.json") as b:
        assert json.load(a) == json.load(b)
    with safe_open(str(mixtral / "hf" / "model.safetensors"), "pt") as a, \
            safe_open(str(tmp_path / "hf2" / "model.safetensors"), "pt") as b:
        assert set(a.keys()) == set(b.keys())
        for key in a.keys():
            assert torch.equal(a.get_tensor(key), b.get_tensor(key)), key


def test_mixtral_config_without_original_and_transformers_loads_it(mixtral, tmp_path):
    """Export without the stored original config (e.g. an upcycled model): transformers loads the
    generated Mixtral config and gives the logits of the original."""
    from transformers import AutoModelForCausalLM

    from megatron_jai.checkpoint.formats.mixtral import hf_config as mixtral_hf_config_from_model_config
    from megatron_jai.checkpoint.stream import CheckpointReader

    cfg = CheckpointReader(str(mixtral / "mcore")).config
    hf = mixtral_hf_config_from_model_config(cfg, base={"model_type": "phi3", "eos_token_id": 7})
    assert hf["model_type"] == "mixtral" and hf["eos_token_id"] == 7
    assert hf["num_local_experts"] == EXPERTS and hf["intermediate_size"] == FFN
    hf_dir = tmp_path / "generated"
    os.makedirs(hf_dir)
    with open(hf_dir / "config.json", "w") as f:
        json.dump(hf, f)
    os.link(mixtral / "hf" / "model.safetensors", hf_dir / "model.safetensors")
    ids = torch.randint(0, 200, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a = AutoModelForCausalLM.from_pretrained(str(mixtral / "hf")).eval()(ids).logits
        b = AutoModelForCausalLM.from_pretrained(str(hf_dir)).eval()(ids).logits
    torch.testing.assert_close(a, b)


def test_bad_expert_layouts_and_configs_fail_cleanly(mixtral, tmp_path):
    from megatron_jai.checkpoint.formats import ConversionError, model_config_from_hf
    from megatron_jai.checkpoint.formats.mixtral import hf_config as mixtral_hf_config_from_model_config
    from megatron_jai.presets import TINY, TINY_MOE

    res = run_cmd([sys.executable, CONVERT, "hf-to-mcore", "--hf-dir", str(mixtral / "hf"),
                   "--out", str(tmp_path / "m"), "--ep", "3"], check=False)
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines() == [
        "convert_checkpoint.py: error: expert parallel size 3 must divide num_experts 4"], res.stderr
    assert not os.path.exists(tmp_path / "m")

    with open(mixtral / "hf" / "config.json") as f:
        hf = json.load(f)
    with pytest.raises(ConversionError, match="sliding-window"):
        model_config_from_hf({**hf, "sliding_window": 4096})
    with pytest.raises(ConversionError, match="expert bias"):
        mixtral_hf_config_from_model_config(TINY_MOE.replace(moe_expert_bias=True))
    with pytest.raises(ConversionError, match="renormalises"):
        mixtral_hf_config_from_model_config(TINY_MOE.replace(moe_normalize_topk=False))
    from megatron_jai.checkpoint.convert import validate_layout

    with pytest.raises(ConversionError, match="needs an MoE model"):
        validate_layout(TINY, 1, 1, ep=2)
