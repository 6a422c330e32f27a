"""Embedding surgery for an extended tokenizer (megatron_jai.upscale.vocab, `upscale.py vocab`)."""
import os
import sys

import pytest
import torch

from conftest import REPO_ROOT, run_cmd, torchrun
from megatron_jai.checkpoint.stream import CheckpointReader, CheckpointWriter
from megatron_jai.presets import TINY
from megatron_jai.upscale import vocab as V
from megatron_jai.upscale.tokenizer import iter_lines
from test_tokenizer import EXTRA_IDS, make_english_base_tokenizers, make_tiny_thai_tokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
UPSCALE = os.path.join(REPO_ROOT, "tools", "upscale.py")
BASE_CFG = TINY.replace(name="tiny-phi3", vocab_size=32064)  # padded to 32,128 rows
LAYERS = 2


@pytest.fixture(scope="module")
def ext_tok(tmp_path_factory, shared_dir):
    return make_tiny_thai_tokenizer(tmp_path_factory, shared_dir)[1]


@pytest.fixture(scope="module")
def fake_ckpt(tmp_path_factory):
    """A checkpoint with the tensors the surgery touches (random), written by the stream writer."""
    root = str(tmp_path_factory.mktemp("vocab_ckpt") / "base")
    gen = torch.Generator().manual_seed(0)
    rows, h = BASE_CFG.padded_vocab_size, BASE_CFG.hidden_size
    tensors = {V.EMBEDDING_KEY: torch.randn(rows, h, generator=gen),
               V.OUTPUT_KEY: torch.randn(rows, h, generator=gen),
               "decoder.final_layernorm.weight": torch.randn(h, generator=gen)}
    stacked = {"decoder.layers.mlp.linear_fc2.weight": torch.randn(LAYERS, h, 8, generator=gen)}
    with CheckpointWriter(root, BASE_CFG) as w:
        for k, t in tensors.items():
            w.write(k, t)
        for k, t in stacked.items():
            for i in range(LAYERS):
                w.write_layer(k, i, LAYERS, t[i])
    return root, {**tensors, **stacked}


@pytest.mark.parametrize("norm_correction", [False, True])
def test_new_rows_are_means_of_base_splits(fake_ckpt, ext_tok, tmp_path, shared_dir, norm_correction):
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2

    src, tensors = fake_ckpt
    out = str(tmp_path / "ext")
    s = V.extend_vocab(src, ext_tok, out, norm_correction=norm_correction, progress=False)
    vocab = 32011 + EXTRA_IDS
    assert s["vocab"] == vocab and s["new_rows"] == EXTRA_IDS and s["padded_vocab"] == 32512
    r = CheckpointReader(out)
    assert r.config == BASE_CFG.replace(name="tiny-phi3-vocab32400", vocab_size=vocab)
    new_sp = spm.SentencePieceProcessor(model_file=os.path.join(ext_tok, "tokenizer.model"))
    proto = sp_pb2.ModelProto()
    with open(os.path.join(shared_dir, "tokenizers", "phi3", "tokenizer.model"), "rb") as f:
        proto.ParseFromString(f.read())
    proto.normalizer_spec.add_dummy_prefix = False  # spell each piece exactly
    phi3 = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
    for key in (V.EMBEDDING_KEY, V.OUTPUT_KEY):
        old, new = tensors[key], r.read(key)
        assert new.shape == (32512, BASE_CFG.hidden_size)
        assert torch.equal(new[:32011], old[:32011]), "base rows must be unchanged"
        assert torch.count_nonzero(new[vocab:]) == 0, "padding rows are zero"
        target = old[:32011].norm(dim=1).mean()
        for i in (32011, 32011 + EXTRA_IDS // 2, vocab - 1):
            piece = new_sp.id_to_piece(i)
            ids = phi3.encode(piece.replace("\u2581", " "))
            assert len(ids) >= 2, (piece, ids)
            expect = old[ids].mean(0)
            if norm_correction:
                expect = expect * (target / expect.norm())
                assert new[i].norm().item() == pytest.approx(target.item(), rel=1e-5)
            torch.testing.assert_close(new[i], expect, rtol=1e-5, atol=1e-6)
    for key in ("decoder.final_layernorm.weight", "decoder.layers.mlp.linear_fc2.weight"):
        assert torch.equal(r.read(key), tensors[key])
    assert os.path.isfile(os.path.join(out, V.TOKENIZER_SUBDIR, "tokenizer.json"))


def test_base_tokenizer_is_the_checkpoints_own(tmp_path_factory, tmp_path, shared_dir):
    """A base other than Phi-3's (an English BPE of 600 pieces + Phi-3's 11 specials): without
    --base-tokenizer, new rows are the means of the split by the tokenizer the checkpoint carries."""
    import shutil

    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2

    base, ext = make_english_base_tokenizers(tmp_path_factory, shared_dir)
    cfg = TINY.replace(name="tiny-en", vocab_size=611)
    gen = torch.Generator().manual_seed(1)
    tables = {k: torch.randn(cfg.padded_vocab_size, cfg.hidden_size, generator=gen)
              for k in (V.EMBEDDING_KEY, V.OUTPUT_KEY)}
    src = str(tmp_path / "base")
    with CheckpointWriter(src, cfg) as w:
        for k, t in tables.items():
            w.write(k, t)
        shutil.copytree(base, os.path.dirname(w.path(os.path.join(V.TOKENIZER_SUBDIR, "x"))),
                        dirs_exist_ok=True)
    assert V.checkpoint_base_tokenizer(src) == os.path.join(src, V.TOKENIZER_SUBDIR)
    out = run_cmd([sys.executable, UPSCALE, "vocab", "--in", src, "--tokenizer", ext, "--out",
                   str(tmp_path / "ext")]).stdout
    assert "vocab: 611 -> 1200 ids (padded 1280), 589 new rows" in out, out
    proto = sp_pb2.ModelProto()
    with open(os.path.join(base, "tokenizer.model"), "rb") as f:
        proto.ParseFromString(f.read())
    proto.normalizer_spec.add_dummy_prefix = False
    english = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
    new_sp = spm.SentencePieceProcessor(model_file=os.path.join(ext, "tokenizer.model"))
    r = CheckpointReader(str(tmp_path / "ext"))
    for key, old in tables.items():
        new = r.read(key)
        assert torch.equal(new[:611], old[:611])
        for i in (611, 900, 1199):
            ids = english.encode(new_sp.id_to_piece(i).replace("\u2581", " "))
            torch.testing.assert_close(new[i], old[ids].mean(0), rtol=1e-5, atol=1e-6)


@pytest.mark.dist
def test_vocab_extension_preserves_function_tp2(tmp_path, ext_tok, shared_dir):
    """Logits of the extended model equal the base model's on the old vocabulary slice (English
    text whose base and new encodings coincide), both loaded at TP=2."""
    english = tmp_path / "english.txt"
    lines = [line for _, line in zip(range(6), iter_lines(
        os.path.join(shared_dir, "data", "english", "enwiki.valid.jsonl.gz"))) if len(line) > 40]
    english.write_text("\n".join(lines) + "\n")
    thai = tmp_path / "thai.txt"
    thai.write_text(next(iter_lines(os.path.join(shared_dir, "data", "thai", "thaigov_v2.test.jsonl.gz"))))
    out = torchrun(2, os.path.join(HERE, "dist", "tokenizer_vocab_preserve.py"), tmp_path, ext_tok,
                   english, thai)
    assert out.stdout.count("OK rank=") == 2, out.stdout
    assert "vocab: 32064 -> 32400 ids (padded 32512)" in out.stdout


def test_errors_leave_nothing(fake_ckpt, ext_tok, tmp_path, shared_dir):
    src, _ = fake_ckpt
    cases = [
        (dict(src=src, tokenizer=str(tmp_path), out=str(tmp_path / "o1")), "no vocab_map.json"),
        (dict(src=str(tmp_path / "missing"), tokenizer=ext_tok, out=str(tmp_path / "o2")), "does not exist"),
        (dict(src=src, tokenizer=ext_tok, out=str(tmp_path / "o3"),
              base_tokenizer=os.path.join(shared_dir, "tokenizers", "llama3")), "not a sentencepiece model"),
        (dict(src=src, tokenizer=ext_tok, out=src), "exists"),
    ]
    for kwargs, message in cases:
        with pytest.raises((ValueError, OSError), match=message):
            V.extend_vocab(**kwargs, progress=False)
    assert sorted(os.listdir(tmp_path)) == [], "no output may be left behind"
    # through the CLI: one line on stderr, exit status 2
    proc = run_cmd([sys.executable, UPSCALE, "vocab", "--in", src, "--tokenizer", str(tmp_path),
                    "--out", str(tmp_path / "o4")], check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("upscale.py: error: ") and \
        "no vocab_map.json" in proc.stderr, proc.stderr
    assert not os.path.exists(tmp_path / "o4")
