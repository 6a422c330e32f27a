"""megatron_jai.data: tokenizer loading, blends, Megatron-Core datasets, the demo corpus."""
import json
import os
import re

import numpy
import pytest
import torch

from conftest import REPO_ROOT, torchrun
from megatron_jai.data import (DatasetError, TokenizerError, blend_prefixes, build_datasets,
                               ensure_demo_data, load_tokenizer, max_token_id, normalize_blend,
                               sample_shares)
from megatron_jai.data.demo import VERSION, generate_documents


@pytest.fixture(scope="module")
def demo():
    return ensure_demo_data()


# ---- tokenizers ----------------------------------------------------------------------------------
def test_demo_tokenizer(demo):
    tok = load_tokenizer(demo.tokenizer_path)
    assert (tok.vocab_size, tok.eod, demo.vocab_size, demo.eod) == (1024, 2, 1024, 2)
    text = next(generate_documents(1, seed=99))
    ids = tok.encode(text)
    assert ids and ids[0] != tok.bos and max(ids) < 1024
    assert tok.decode(ids) == text
    assert tok.encode_batch([text, "Monday"]) == [ids, tok.encode("Monday")]
    # the grammar's regular text compresses well with its own tokenizer
    assert len(ids) < len(text) / 3
    # byte fallback: any text (e.g. Thai) round-trips, as UTF-8 bytes where no piece fits
    thai = "สวัสดีครับ"
    assert tok.decode(tok.encode(thai)) == thai and 0 not in tok.encode(thai)  # no <unk>


def test_phi3_directory_tokenizer(shared_dir):
    path = os.path.join(shared_dir, "tokenizers", "phi3")
    tok = load_tokenizer(path)
    assert (tok.vocab_size, tok.eod) == (32011, 32000)  # <|endoftext|>
    assert tok.special_tokens["<|user|>"] == 32010
    plain = load_tokenizer(os.path.join(path, "tokenizer.model"))
    assert (plain.vocab_size, plain.eod) == (32000, 2)  # bare sentencepiece: </s>
    text = "Hello world. สวัสดีครับ"
    assert tok.encode(text) == plain.encode(text)
    assert tok.decode(tok.encode(text) + [32000, 32010]) == text + "<|endoftext|><|user|>"
    # special-token strings inside raw text are NOT turned into control ids
    assert 32000 not in tok.encode("a <|endoftext|> b")


def test_sentencepiece_with_special_pieces(tmp_path):
    # the extended Phi-3 vocabularies carry <|endoftext|> etc. as pieces of the model itself:
    # the .model file alone must still end documents with <|endoftext|>, not </s>
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(generate_documents(400, seed=8))), vocab_size=300,
        model_prefix=str(tmp_path / "sp"), model_type="bpe", minloglevel=2,
        user_defined_symbols=["<|endoftext|>", "<|user|>"])
    tok = load_tokenizer(str(tmp_path / "sp.model"))
    assert tok.eod == tok.sp.PieceToId("<|endoftext|>") == 3 and tok.vocab_size == 300
    assert tok.decode(tok.encode("Monday") + [tok.eod]) == "Monday<|endoftext|>"


def test_huggingface_directory_tokenizer(tmp_path, demo):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    hf = Tokenizer(models.BPE(unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "<|eot|>"])
    hf.train_from_iterator(generate_documents(300, seed=5), trainer)
    hf.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|eot|>"}))
    tok = load_tokenizer(str(tmp_path))
    assert tok.kind == "huggingface"
    assert tok.eod == hf.token_to_id("<|eot|>") == 2
    assert tok.vocab_size == hf.get_vocab_size()
    text = "Monday, Tuesday, Wednesday."
    assert tok.encode(text) == hf.encode(text).ids
    assert tok.decode(tok.encode(text)) == text


def test_tokenizer_errors(tmp_path):
    with pytest.raises(TokenizerError, match="does not exist"):
        load_tokenizer(str(tmp_path / "missing"))
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"\x00not a model")
    with pytest.raises(TokenizerError, match="not a sentencepiece model"):
        load_tokenizer(str(junk))
    with pytest.raises(TokenizerError, match="no loadable tokenizer"):
        load_tokenizer(str(tmp_path))  # an empty directory


# ---- blends --------------------------------------------------------------------------------------
def test_normalize_blend_forms_and_errors():
    assert normalize_blend("a") == (["a"], None)
    assert normalize_blend(["a", "b"]) == (["a", "b"], None)
    assert normalize_blend([(1, "a"), ("b", 3)]) == (["a", "b"], [0.25, 0.75])
    prefixes, weights = normalize_blend({"th": 0.27, "en": 0.73})
    assert prefixes == ["th", "en"] and weights == pytest.approx([0.27, 0.73])
    assert normalize_blend({"only": 1.0}) == (["only"], None)
    for bad, msg in [({"th": 0.27, "en": 0.5}, "sum to 1"), ([(0, "a"), (1, "b")], "positive"),
                     ([], "empty"), ([(1, "a"), (1, "a")], "twice"), ([(1, 2, 3)], "pairs"),
                     ([("x", "a"), ("y", "b")], "not a number")]:
        with pytest.raises(DatasetError, match=msg):
            normalize_blend(bad)


# ---- datasets ------------------------------------------------------------------------------------
def test_build_datasets_items_determinism_and_cache(tmp_path, demo):
    cache = tmp_path / "idx"
    kw = dict(seq_length=32, num_samples=50, tokenizer=demo.tokenizer_path, cache_dir=str(cache))
    train, valid = build_datasets(demo.data_prefix, seed=1, valid_blend=demo.valid_prefix,
                                  valid_num_samples=7, **kw)
    assert len(train) >= 50 and len(valid) >= 7
    item = train[0]
    assert set(item) == {"tokens", "labels", "loss_mask", "position_ids"}
    assert item["tokens"].shape == (32,) and item["tokens"].dtype == torch.int64
    assert torch.equal(item["tokens"][1:], item["labels"][:-1])  # labels = next tokens
    assert torch.equal(item["position_ids"], torch.arange(32))
    assert item["loss_mask"].sum() == 32
    # a sample is stretches of corpus documents (in shuffled document order): its first
    # stretch, up to the first EOD, occurs verbatim in the corpus
    corpus = numpy.memmap(demo.data_prefix + ".bin", dtype=numpy.uint16, mode="r")
    seq = item["tokens"].numpy()
    head = seq[: (numpy.flatnonzero(seq == demo.eod)[:1].tolist() or [len(seq) - 1])[0] + 1]
    hits = numpy.flatnonzero(corpus[: len(corpus) - len(head)] == head[0])
    assert len(head) >= 2 and any((corpus[h:h + len(head)] == head).all() for h in hits)
    # same seed -> same samples (also from the cache); another seed -> another order
    again, _ = build_datasets(demo.data_prefix, seed=1, valid_blend=demo.valid_prefix,
                              valid_num_samples=7, **kw)
    assert all(torch.equal(train[i]["tokens"], again[i]["tokens"]) for i in range(10))
    other, _ = build_datasets(demo.data_prefix, seed=2, **kw)
    assert not all(torch.equal(train[i]["tokens"], other[i]["tokens"]) for i in range(10))
    assert any(f.endswith("shuffle_index.npy") for f in os.listdir(cache))
    assert not os.path.exists(os.path.join(demo.root, "cache"))  # nothing next to the data
    # no split, no valid blend -> no validation set; a split string -> one
    assert build_datasets(demo.data_prefix, seed=1, **kw)[1] is None
    _, split_valid = build_datasets(demo.data_prefix, seed=1, split="9,1", valid_num_samples=3, **kw)
    assert len(split_valid) >= 3


def test_blended_dataset_ids_and_eod_mask(tmp_path, demo):
    train, _ = build_datasets([(3, demo.data_prefix), (1, demo.valid_prefix)], seq_length=16,
                              num_samples=400, seed=4, eod=demo.eod, vocab_size=demo.vocab_size,
                              cache_dir=str(tmp_path), eod_mask_loss=True)
    assert blend_prefixes(train) == [demo.data_prefix, demo.valid_prefix]
    assert [round(v, 3) for v in sample_shares(train, 400).values()] == [0.75, 0.25]
    ids = [int(train[i]["dataset_id"]) for i in range(400)]
    assert ids.count(1) == 100
    eods = [train[i] for i in range(50) if (train[i]["tokens"] == demo.eod).any()]
    assert eods, "documents are packed, so some samples hold an EOD"
    for it in eods:
        assert (it["loss_mask"][it["tokens"] == demo.eod] == 0).all()


def test_dataset_vocabulary_checks(tmp_path, demo):
    assert max_token_id(demo.data_prefix) < demo.vocab_size
    with pytest.raises(DatasetError, match="1024-id vocabulary"):
        build_datasets(demo.data_prefix, 16, 10, eod=demo.eod, vocab_size=64000,
                       cache_dir=str(tmp_path))
    with pytest.raises(DatasetError, match="missing"):
        build_datasets(str(tmp_path / "nothing"), 16, 10, eod=2, cache_dir=str(tmp_path))


# ---- demo corpus ---------------------------------------------------------------------------------
def test_demo_corpus_is_deterministic_and_cached(demo):
    assert list(generate_documents(20)) == list(generate_documents(20))
    assert list(generate_documents(5, seed=1)) != list(generate_documents(5, seed=2))
    mtime = os.path.getmtime(demo.data_prefix + ".bin")
    assert ensure_demo_data() == demo
    assert os.path.getmtime(demo.data_prefix + ".bin") == mtime
    assert demo.train_tokens > 500_000 and demo.valid_documents > 0
    size = sum(os.path.getsize(os.path.join(demo.root, f)) for f in os.listdir(demo.root))
    assert size < 8 * 2**20


@pytest.mark.dist
def test_two_ranks_build_demo_and_datasets_together(tmp_path):
    # a fresh cache: both ranks call ensure_demo_data at once, then build_datasets under gloo
    proc = torchrun(2, os.path.join(REPO_ROOT, "tests", "dist", "data_build.py"), tmp_path)
    found = re.findall(r"rank (\d): train (\d+) valid (\d+) shares \[([^]]*)\] checksum (\d+)",
                       proc.stdout)
    assert sorted(f[0] for f in found) == ["0", "1"], proc.stdout + proc.stderr
    assert found[0][1:] == found[1][1:]  # same datasets, same samples on both ranks
    assert found[0][3] == "0.7, 0.3"
    assert sorted(os.listdir(tmp_path)) == [f".demo-v{VERSION}.lock", f"demo-v{VERSION}", "idx"]
