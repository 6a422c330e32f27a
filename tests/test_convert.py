"""HF Phi-3 <-> Megatron-Core conversion: layouts, logits at TP=1/TP=2/PP=2, round trip, bad input."""
import json
import os
import shutil
import sys

import pytest
import torch

from conftest import REPO_ROOT, load_tool, run_cmd, torchrun
from export_helpers import tiny_tokenizer
from megatron_jai import cli
from megatron_jai.checkpoint.formats import ConversionError, model_config_from_hf
from megatron_jai.checkpoint.formats.phi3 import (hf_config as hf_config_from_model_config,
                                                  qkv_hf_to_mcore, qkv_mcore_to_hf)
from megatron_jai.config import SkipConnection
from megatron_jai.presets import PHI3_MEDIUM, TINY

CONVERT = os.path.join(REPO_ROOT, "tools", "convert_checkpoint.py")
COMPARE = os.path.join(REPO_ROOT, "tools", "compare_logits.py")


def _tool_main():
    """``tools/convert_checkpoint.py`` in-process, with the command line's exit codes."""
    main = load_tool("convert_checkpoint").main
    return lambda argv: cli.run("convert_checkpoint.py", main, argv)


def make_tiny_phi3(path, max_shard_size=None, seed=0):
    """A random Phi3ForCausalLM: 4 layers, hidden 64, 4 query heads over 2 KV heads, vocabulary 200
    (not a multiple of 128, so padding is exercised), weights large enough that mistakes show."""
    from transformers import GenerationConfig, Phi3Config, Phi3ForCausalLM

    torch.manual_seed(seed)
    config = Phi3Config(vocab_size=200, hidden_size=64, intermediate_size=160, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                        rope_theta=500000.0, initializer_range=0.1, pad_token_id=0, bos_token_id=1,
                        eos_token_id=2)
    model = Phi3ForCausalLM(config)
    with torch.no_grad():  # non-trivial norm weights, so a swapped norm would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kw)
    GenerationConfig(bos_token_id=1, eos_token_id=2, max_new_tokens=7).save_pretrained(path)
    return model


def _safetensors(path):
    from safetensors import safe_open

    out = {}
    index = os.path.join(path, "model.safetensors.index.json")
    files = sorted(set(json.load(open(index))["weight_map"].values())) if os.path.isfile(index) \
        else ["model.safetensors"]
    for name in files:
        with safe_open(os.path.join(path, name), "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("convert")
    make_tiny_phi3(root / "hf", seed=0)
    make_tiny_phi3(root / "hf_sharded", max_shard_size="100KB", seed=1)
    assert os.path.isfile(root / "hf_sharded" / "model.safetensors.index.json")
    return root


# ---- layouts and configs -----------------------------------------------------------------------
def test_qkv_layout_grouped_per_query_group():
    cfg = TINY.replace(hidden_size=8, num_attention_heads=4, num_query_groups=2, kv_channels=1)
    # rows labelled by their HF meaning: q0..q3, k0, k1, v0, v1
    hf = torch.arange(8.0).unsqueeze(1).expand(8, 8)
    mc = qkv_hf_to_mcore(cfg, hf)
    # Megatron: [q0 q1 k0 v0 | q2 q3 k1 v1]
    assert mc[:, 0].tolist() == [0, 1, 4, 6, 2, 3, 5, 7]
    assert torch.equal(qkv_mcore_to_hf(cfg, mc), hf)
    mha = cfg.replace(num_query_groups=4)
    hf = torch.arange(12.0).unsqueeze(1).expand(12, 8)
    assert qkv_hf_to_mcore(mha, hf)[:, 0].tolist() == [0, 4, 8, 1, 5, 9, 2, 6, 10, 3, 7, 11]
    medium = torch.randn((40 + 2 * 10) * 128, 16)
    assert torch.equal(qkv_mcore_to_hf(PHI3_MEDIUM, qkv_hf_to_mcore(PHI3_MEDIUM, medium)), medium)


def test_config_mapping():
    base = {"model_type": "phi3", "num_hidden_layers": 40, "hidden_size": 5120, "num_attention_heads": 40,
            "num_key_value_heads": 10, "intermediate_size": 17920, "vocab_size": 32064,
            "max_position_embeddings": 4096, "rope_theta": 10000.0, "rms_norm_eps": 1e-5,
            "tie_word_embeddings": False, "initializer_range": 0.02, "rope_scaling": None}
    cfg = model_config_from_hf(base, name="phi3-medium")
    assert cfg == PHI3_MEDIUM
    assert cfg.padded_vocab_size == 32128
    assert hf_config_from_model_config(cfg, base) == base  # unchanged when nothing changed
    v5 = {k: v for k, v in base.items() if k not in ("rope_theta", "rope_scaling")}
    v5["rope_parameters"] = {"rope_theta": 250000.0, "rope_type": "default"}
    assert model_config_from_hf(v5).rotary_base == 250000.0
    deeper = hf_config_from_model_config(cfg.replace(num_layers=64, vocab_size=64000), base)
    assert deeper["num_hidden_layers"] == 64 and deeper["vocab_size"] == 64000
    from transformers import Phi3Config

    fresh = Phi3Config(**hf_config_from_model_config(TINY))  # no original config: the template
    assert fresh.num_key_value_heads == TINY.num_query_groups
    with pytest.raises(ConversionError, match="longrope"):
        model_config_from_hf({**base, "rope_scaling": {"type": "longrope", "short_factor": [1.0]}})
    with pytest.raises(ConversionError, match="model_type 'llama'"):
        model_config_from_hf({**base, "model_type": "llama"})
    with pytest.raises(ConversionError, match="skip connections"):
        hf_config_from_model_config(cfg.replace(skip_connections=(SkipConnection(2, 4),)))


# ---- conversion, logits, round trip ------------------------------------------------------------
@pytest.mark.dist
def test_convert_and_compare_logits(tiny, capsys):
    hf, mc = tiny / "hf_sharded", tiny / "mcore_sharded"
    assert _tool_main()(["hf-to-mcore", "--hf-dir", str(hf), "--out", str(mc), "--tp", "2", "--pp", "2",
                         "--no-progress"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1].startswith("hf-to-mcore: 27 tensors,") and "peak RSS" in out[-1], out
    assert json.load(open(mc / "model_config.json"))["vocab_size"] == 200
    for nproc, tp, pp in ((1, 1, 1), (2, 2, 1), (2, 1, 2)):
        where = mc / "iter_0000000" if nproc == 1 else mc  # a root or one iteration directory
        res = torchrun(nproc, COMPARE, "--hf-dir", hf, "--mcore-dir", where, "--tp", tp, "--pp", pp,
                       "--seq-len", 24)
        last = res.stdout.strip().splitlines()[-1]
        assert last.startswith("max_abs_logit_diff "), res.stdout
        assert float(last.split()[1]) <= 1e-4, res.stdout
        assert "argmax agreement 1.0000" in res.stdout


@pytest.mark.dist
def test_compare_logits_catches_plain_qkv_copy(tiny, tmp_path):
    """The trap: copying qkv_proj without regrouping must be caught by compare_logits."""
    from megatron_jai.checkpoint.convert import hf_to_mcore
    from megatron_jai.checkpoint.stream import CheckpointReader, CheckpointWriter

    good, bad = tmp_path / "good", tmp_path / "bad"
    hf_to_mcore(str(tiny / "hf"), str(good), progress=False)
    r = CheckpointReader(str(good))
    with CheckpointWriter(str(bad), r.config) as w:
        for key in r.keys():
            if not r.is_stacked(key):
                w.write(key, r.read(key))
                continue
            layers = r.shape(key)[0]
            for i in range(layers):
                t = r.read_layer(key, i)
                w.write_layer(key, i, layers, qkv_mcore_to_hf(r.config, t) if "linear_qkv.weight" in key else t)
    res = torchrun(1, COMPARE, "--hf-dir", tiny / "hf", "--mcore-dir", bad, check=False)
    assert res.returncode == 1, res.stdout  # the check failed (not bad input: 2)
    assert float(res.stdout.strip().splitlines()[-1].split()[1]) > 1e-2, res.stdout


def test_round_trip_bit_identical(tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    tool = _tool_main()
    for hf, max_shard in ((tiny / "hf", "5GB"), (tiny / "hf_sharded", "200KB")):
        mc, back = tmp_path / f"{hf.name}_mc", tmp_path / f"{hf.name}_back"
        assert tool(["hf-to-mcore", "--hf-dir", str(hf), "--out", str(mc), "--no-progress"]) == 0
        (mc / "tokenizer").mkdir()  # as vocabulary surgery leaves it: travels to the HF side
        shutil.copy(tiny_tokenizer(str(tmp_path / "tok")), mc / "tokenizer" / "tokenizer.model")
        assert tool(["mcore-to-hf", "--mcore-dir", str(mc), "--out", str(back), "--no-progress",
                     "--max-shard-size", max_shard]) == 0
        assert (back / "tokenizer.model").read_bytes() == (mc / "tokenizer" / "tokenizer.model").read_bytes()
        a, b = _safetensors(hf), _safetensors(back)
        assert sorted(a) == sorted(b)
        for k in a:
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
        for name in ("config.json", "generation_config.json"):
            assert (hf / name).read_bytes() == (back / name).read_bytes(), name
        assert os.path.isfile(back / "model.safetensors.index.json") == (max_shard == "200KB")
        model = AutoModelForCausalLM.from_pretrained(back)
        assert model.config.num_key_value_heads == 2
        assert torch.equal(model.state_dict()["model.layers.3.self_attn.qkv_proj.weight"],
                           a["model.layers.3.self_attn.qkv_proj.weight"])


# ---- bad input: one line on stderr, non-zero exit, nothing written -----------------------------
def _expect_failure(args, match, out, capsys):
    parent = os.path.dirname(out)
    before = sorted(os.listdir(parent)) if os.path.isdir(parent) else []
    rc = _tool_main()(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0
    assert len(err) == 1 and err[0].startswith("convert_checkpoint.py: error:") and match in err[0], err
    after = sorted(os.listdir(parent)) if os.path.isdir(parent) else []
    assert after == before, "something was written"


def test_bad_input(tiny, tmp_path, capsys):
    out = str(tmp_path / "out")
    h2m = ["hf-to-mcore", "--out", out, "--no-progress", "--hf-dir"]

    broken = tmp_path / "missing_shard"
    shutil.copytree(tiny / "hf_sharded", broken)
    os.remove(broken / sorted(f for f in os.listdir(broken) if f.startswith("model-"))[1])
    _expect_failure(h2m + [str(broken)], "is missing", out, capsys)

    truncated = tmp_path / "truncated"
    shutil.copytree(tiny / "hf", truncated)
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    _expect_failure(h2m + [str(truncated)], "truncated", out, capsys)

    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    shutil.copy(tiny / "hf" / "config.json", no_weights)
    _expect_failure(h2m + [str(no_weights)], "neither", out, capsys)

    llama = tmp_path / "llama"
    shutil.copytree(tiny / "hf", llama)
    cfg = json.load(open(llama / "config.json"))
    json.dump({**cfg, "model_type": "llama"}, open(llama / "config.json", "w"))
    _expect_failure(h2m + [str(llama)], "only 'phi3'", out, capsys)

    _expect_failure(h2m + [str(tiny / "hf"), "--tp", "3"], "must divide the attention heads", out, capsys)
    _expect_failure(h2m + [str(tiny / "hf"), "--pp", "3"], "must divide num_layers", out, capsys)

    os.makedirs(out)
    _expect_failure(h2m + [str(tiny / "hf")], "already exists", out, capsys)
    _expect_failure(["mcore-to-hf", "--mcore-dir", str(tiny / "hf"), "--out", str(tmp_path / "o2")],
                    "not a checkpoint", str(tmp_path / "o2"), capsys)
    assert os.listdir(out) == []
    # --force replaces the existing output
    assert _tool_main()(h2m + [str(tiny / "hf"), "--force"]) == 0
    assert os.path.isfile(os.path.join(out, "latest_checkpointed_iteration.txt"))


def test_cli_error_has_no_traceback(tiny, tmp_path):
    llama = tmp_path / "llama"
    shutil.copytree(tiny / "hf", llama)
    json.dump({**json.load(open(llama / "config.json")), "model_type": "llama"},
              open(llama / "config.json", "w"))
    res = run_cmd([sys.executable, CONVERT, "hf-to-mcore", "--hf-dir", str(llama), "--out",
                   str(tmp_path / "m")], check=False)
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines() == [
        "convert_checkpoint.py: error: config.json has model_type 'llama'; only 'phi3' (Phi-3), "
        "'mixtral' (MoE) and 'jai' (exported by this toolkit) checkpoints are supported"], res.stderr
    assert not os.path.exists(tmp_path / "m")


def test_compare_logits_refuses_different_models(tiny, tmp_path):
    """An HF directory that is not the checkpoint's model: one line before any rank starts work."""
    from megatron_jai.checkpoint.convert import hf_to_mcore

    hf_to_mcore(str(tiny / "hf"), str(tmp_path / "mc"), progress=False)
    other = tmp_path / "other"
    shutil.copytree(tiny / "hf", other)
    json.dump({**json.load(open(other / "config.json")), "num_hidden_layers": 2},
              open(other / "config.json", "w"))
    res = run_cmd([sys.executable, COMPARE, "--hf-dir", str(other), "--mcore-dir",
                   str(tmp_path / "mc")], check=False)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines() == [
        f"compare_logits.py: error: {other} and {tmp_path / 'mc'} are different models (HF vs "
        f"Megatron: num_layers 2 vs 4)"], res.stderr


def test_exported_config_names_the_stored_dtype(tiny, tmp_path):
    """hf-to-mcore --dtype bf16 of an fp32 model, exported back without a cast: the HF config must
    say bfloat16 (transformers would otherwise load the bf16 tensors as the original float32)."""
    from megatron_jai.checkpoint.convert import hf_to_mcore
    from megatron_jai.hf.export import mcore_to_hf

    hf_to_mcore(str(tiny / "hf"), str(tmp_path / "mc"), dtype=torch.bfloat16, progress=False)
    mcore_to_hf(str(tmp_path / "mc"), str(tmp_path / "back"), progress=False,
                tokenizer=tiny_tokenizer(str(tmp_path / "tok")))
    assert json.load(open(tiny / "hf" / "config.json"))["dtype"] == "float32"
    assert json.load(open(tmp_path / "back" / "config.json"))["dtype"] == "bfloat16"
    assert {t.dtype for t in _safetensors(tmp_path / "back").values()} == {torch.bfloat16}
