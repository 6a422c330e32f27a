"""The streaming checkpoint reader/writer (megatron_jai.checkpoint.stream)."""
import os

import pytest
import torch

from conftest import torchrun
from megatron_jai.checkpoint.stream import CheckpointFormatError, CheckpointReader, CheckpointWriter
from megatron_jai.presets import TINY

HERE = os.path.dirname(os.path.abspath(__file__))


def _write_small(root, layers=3, **kw):
    gen = torch.Generator().manual_seed(0)
    tensors = {"embedding.word_embeddings.weight": torch.randn(256, 8, generator=gen)}
    stacked = {"decoder.layers.self_attention.linear_qkv.weight": torch.randn(layers, 16, 8, generator=gen),
               "decoder.layers.self_attention.linear_qkv.layer_norm_weight": torch.randn(layers, 8, generator=gen)}
    with CheckpointWriter(root, TINY, iteration=2, **kw) as w:
        for k, t in tensors.items():
            w.write(k, t)
        for k, t in stacked.items():
            for i in range(layers):
                w.write_layer(k, i, layers, t[i])
    return tensors, stacked


def test_write_read_roundtrip(tmp_path):
    root = tmp_path / "ckpt"
    tensors, stacked = _write_small(root)
    for r in (CheckpointReader(str(root)), CheckpointReader(str(root / "iter_0000002"))):
        assert r.config == TINY and r.iteration == 2
        assert sorted(r.keys()) == sorted({**tensors, **stacked})
        for k, t in {**tensors, **stacked}.items():
            assert r.shape(k) == t.shape and r.dtype(k) == t.dtype
            assert torch.equal(r.read(k), t)
        for k, t in stacked.items():
            for i in range(t.shape[0]):
                assert torch.equal(r.read_layer(k, i), t[i])
        assert torch.equal(r.read_region("embedding.word_embeddings.weight", (10, 2), (5, 3)),
                           tensors["embedding.word_embeddings.weight"][10:15, 2:5])
        # linear layers get their _extra_state objects, norms do not
        assert sorted(r.object_keys()) == [
            f"decoder.layers.self_attention.linear_qkv._extra_state/shard_{i}_3" for i in range(3)]
        assert r.read_object(r.object_keys()[0]) is None
    assert not [p for p in os.listdir(tmp_path) if p != "ckpt"], "temporary directory left behind"


def test_writer_errors_leave_nothing(tmp_path):
    root = tmp_path / "ckpt"
    with pytest.raises(ValueError, match="never written"):
        with CheckpointWriter(str(root), TINY) as w:
            w.write_layer("decoder.layers.mlp.linear_fc2.weight", 0, 2, torch.zeros(4, 4))
    with pytest.raises(RuntimeError, match="boom"):
        with CheckpointWriter(str(root), TINY) as w:
            w.write("output_layer.weight", torch.zeros(4, 4))
            raise RuntimeError("boom")
    with pytest.raises(ValueError, match="conflicts"):
        with CheckpointWriter(str(root), TINY) as w:
            w.write_layer("decoder.layers.x.weight", 0, 2, torch.zeros(4, 4))
            w.write_layer("decoder.layers.x.weight", 1, 2, torch.zeros(5, 4))
    assert os.listdir(tmp_path) == []
    _write_small(root)
    with pytest.raises(FileExistsError):
        CheckpointWriter(str(root), TINY)
    _write_small(root, layers=2, force=True)  # --force replaces the old checkpoint completely
    assert CheckpointReader(str(root)).shape("decoder.layers.self_attention.linear_qkv.weight")[0] == 2
    assert os.listdir(tmp_path) == ["ckpt"]


def test_reader_rejects_non_checkpoints(tmp_path):
    with pytest.raises(CheckpointFormatError, match="does not exist"):
        CheckpointReader(str(tmp_path / "missing"))
    with pytest.raises(CheckpointFormatError, match="not a checkpoint"):
        CheckpointReader(str(tmp_path))
    root = tmp_path / "ckpt"
    _write_small(root)
    data = root / "iter_0000002" / "__0_0.distcp"
    data.write_bytes(data.read_bytes()[:100])
    from megatron_jai.checkpoint.manifest import CheckpointIntegrityError

    with pytest.raises(CheckpointIntegrityError, match=r"__0_0.distcp: truncated \(100 bytes"):
        CheckpointReader(str(root))  # the manifest, before anything is read
    with pytest.raises(CheckpointFormatError, match="truncated"):  # the reader's own check
        CheckpointReader(str(root), verify=False).read(
            "decoder.layers.self_attention.linear_qkv.weight")


@pytest.mark.dist
def test_reader_writer_with_megatron_models(tmp_path):
    """save_checkpoint -> reader, writer -> load_checkpoint at TP=2, PP=2 and TP=1 (2 processes)."""
    out = torchrun(2, os.path.join(HERE, "dist", "convert_stream.py"), tmp_path).stdout
    for what in ("reader == save_checkpoint", "loaded at TP=2 PP=1", "loaded at TP=1 PP=2",
                 "loaded at TP=1 PP=1"):
        assert out.count(what) == 2, out

    # A checkpoint saved by save_checkpoint (no original HF config) exports to a loadable Phi-3.
    from transformers import AutoModelForCausalLM

    from export_helpers import tiny_tokenizer
    from megatron_jai.checkpoint.formats.phi3 import qkv_mcore_to_hf
    from megatron_jai.hf.export import mcore_to_hf

    reader = CheckpointReader(str(tmp_path / "saved"))
    mcore_to_hf(str(tmp_path / "saved"), str(tmp_path / "hf"), progress=False,
                tokenizer=tiny_tokenizer(str(tmp_path / "tok")))
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"))
    cfg = reader.config
    assert model.config.vocab_size == cfg.vocab_size == 200
    sd = model.state_dict()
    assert torch.equal(sd["lm_head.weight"], reader.read("output_layer.weight")[:200])
    assert torch.equal(sd["model.layers.2.self_attn.qkv_proj.weight"],
                       qkv_mcore_to_hf(cfg, reader.read_layer("decoder.layers.self_attention.linear_qkv.weight", 2)))
    assert torch.equal(sd["model.layers.1.post_attention_layernorm.weight"],
                       reader.read_layer("decoder.layers.mlp.linear_fc1.layer_norm_weight", 1))


def test_reader_config_is_the_iterations_own(tmp_path):
    """A training checkpoint records each iteration's config (RoPE changes between phases) in its
    common state; the root's model_config.json is the newest run's. The reader uses the former."""
    root = tmp_path / "ckpt"
    phase3 = TINY.replace(rotary_base=40000.0, rotary_interpolation_factor=2.0)
    with CheckpointWriter(str(root), TINY) as w:
        w.write("output_layer.weight", torch.zeros(4, 4))
        w.finalize(common={"model_config": phase3.to_dict()})
    assert CheckpointReader(str(root)).config == phase3
    with CheckpointWriter(str(tmp_path / "plain"), TINY) as w:
        w.write("output_layer.weight", torch.zeros(4, 4))
    assert CheckpointReader(str(tmp_path / "plain")).config == TINY
