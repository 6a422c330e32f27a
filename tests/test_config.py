import json

import pytest
import torch

from conftest import run_tool
from megatron_jai.config import ModelConfig, ModelConfigError, SkipConnection
from megatron_jai.presets import JAI_75B, PHI3_MEDIUM, PRESETS, TINY, TINY_MOE, get_preset


def test_phi3_medium_parameter_count():
    counts = PHI3_MEDIUM.parameter_counts()
    assert counts["total"] == counts["active"]
    assert round(counts["total"] / 1e9, 2) == 13.96


def test_jai_75b_parameter_counts():
    counts = JAI_75B.parameter_counts()
    assert round(counts["total"] / 1e9, 1) == 75.3
    assert round(counts["active"] / 1e9, 1) == 40.1


def test_phi3_medium_is_phi3_medium():
    c = PHI3_MEDIUM
    assert (c.num_layers, c.hidden_size, c.num_attention_heads, c.num_query_groups) == (40, 5120, 40, 10)
    assert (c.ffn_hidden_size, c.vocab_size, c.rotary_base, c.norm_epsilon) == (17920, 32064, 10000.0, 1e-5)
    assert not c.tie_embeddings and not c.is_moe


def test_every_preset_counts_and_round_trips(tmp_path):
    for name, cfg in PRESETS.items():
        counts = cfg.parameter_counts()
        assert 0 < counts["active"] <= counts["total"], name
        path = tmp_path / f"{name}.json"
        cfg.save(str(path))
        assert ModelConfig.load(str(path)) == cfg


def test_padded_vocab_is_tp_independent():
    assert PHI3_MEDIUM.padded_vocab_size == 32128
    assert JAI_75B.padded_vocab_size == 64000


def test_bad_layouts_are_refused():
    with pytest.raises(ValueError, match="must divide the attention heads"):
        PHI3_MEDIUM.transformer_config(tp=3)
    with pytest.raises(ValueError, match="must divide num_layers"):
        PHI3_MEDIUM.transformer_config(pp=3)
    with pytest.raises(ValueError, match="unknown model preset"):
        get_preset("nope")


@pytest.mark.parametrize("changes,message", [
    ({"moe_top_k": 0}, "moe_top_k must be in [1, num_experts = 4], got 0"),
    ({"moe_top_k": 5}, "moe_top_k must be in [1, num_experts = 4], got 5"),
    ({"skip_connections": (SkipConnection(0, 2, 1.5),)},
     "skip_connections: skip 0->2: alphas must lie in [0, 1]"),
    ({"skip_connections": (SkipConnection(1, 4),)},
     "skip_connections: skip 1->4 needs 0 <= source < target < 4"),
    ({"skip_connections": (SkipConnection(0, 2), SkipConnection(0, 2, 0.5))},
     "skip_connections: skip 0->2 given twice"),
    ({"num_layers": 0}, "num_layers must be at least 1, got 0"),
    ({"num_query_groups": 3}, "num_query_groups (3) must divide num_attention_heads (4)"),
    ({"hidden_size": 64.0}, "hidden_size must be of type int, got 64.0"),
    ({"moe_capacity_factor": 0.0}, "moe_capacity_factor must be positive (or null), got 0.0"),
    ({"moe_token_drop_policy": "random"}, "moe_token_drop_policy must be one of probs, position"),
])
def test_config_checks_itself_and_names_the_field(changes, message):
    with pytest.raises(ModelConfigError) as e:
        TINY_MOE.replace(**changes)
    assert str(e.value).startswith(f"model config 'tiny-moe': {message}"), str(e.value)
    assert TINY.replace(moe_top_k=0).moe_top_k == 0  # a dense model has no top-k to check


def test_skip_connections_serialise_in_one_shape():
    skip = SkipConnection(1, 3, 0.5, 0.25)
    assert skip.to_dict() == {"source": 1, "target": 3, "alpha_train": 0.5, "alpha_infer": 0.25}
    assert SkipConnection.from_dict(skip.to_dict()) == skip
    assert SkipConnection.from_dict({"source": 1, "target": 3}, 0.7, 0.6) == SkipConnection(1, 3, 0.7, 0.6)
    with pytest.raises(ModelConfigError, match="needs source, target, alpha_train and alpha_infer"):
        SkipConnection.from_dict({"source": 1, "target": 3}, None, None)
    with pytest.raises(ModelConfigError, match=r"needs source and target \(and optionally"):
        SkipConnection.from_dict({"source": 1, "target": 3, "alpha": 0.5})
    cfg = TINY.replace(skip_connections=(skip,))
    assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


@pytest.mark.parametrize("edit,message", [
    (lambda d: d["skip_connections"][0].update(alpha_train=1.5), "skip 0->2: alphas must lie in [0, 1]"),
    (lambda d: d.update(num_experts=4, moe_top_k=0), "moe_top_k must be in [1, num_experts = 4], got 0"),
    (lambda d: d["skip_connections"][0].update(target=9), "skip 0->9 needs 0 <= source < target < 4"),
    (lambda d: d["skip_connections"][0].pop("source"), "a skip needs source and target"),
    (lambda d: d.pop("hidden_size"), "model config is missing fields ['hidden_size']"),
])
def test_hand_edited_model_config_is_refused_with_one_line(edit, message, tmp_path, capsys):
    from megatron_jai.checkpoint.stream import CheckpointWriter

    cfg = TINY.replace(skip_connections=(SkipConnection(0, 2),))
    with CheckpointWriter(str(tmp_path / "M"), cfg) as w:
        w.write_layer("decoder.layers.mlp.linear_fc2.weight", 0, 1, torch.zeros(2, 2))
    path = tmp_path / "M" / "model_config.json"
    d = json.loads(path.read_text())
    edit(d)
    path.write_text(json.dumps(d))
    _, err = run_tool(capsys, "upscale", "dus", "--in", tmp_path / "M", "--plan", "phi3-medium-jai",
                      "--out", tmp_path / "D", expect_rc=2)
    assert len(err.strip().splitlines()) == 1 and message in err, err
    assert not (tmp_path / "D").exists()
