import pytest

from megatron_jai.config import JAI_75B, PHI3_MEDIUM, PRESETS, ModelConfig, get_preset


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
