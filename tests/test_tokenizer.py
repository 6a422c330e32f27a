"""Thai tokenizer adaptation: train, extend Phi-3's vocabulary, measure tokens per character."""
import gzip
import itertools
import json
import os
import sys

import pytest

from conftest import REPO_ROOT, load_tool, run_cmd, run_tool
from megatron_jai.upscale import tokenizer as T

TOOLS = os.path.join(REPO_ROOT, "tools")
EXTRA_IDS = 389  # tiny extension for tests: 32,011 base ids + 389 Thai pieces = 32,400


def make_tiny_thai_tokenizer(tmp_path_factory, shared_dir, vocab=1000, target=32011 + EXTRA_IDS):
    """Train a tiny Thai BPE on a small slice of thaigov valid and extend Phi-3 with it (CLIs),
    once per test session. Returns (thai_bpe_dir, extended_tokenizer_dir)."""
    work = str(tmp_path_factory.getbasetemp() / "tiny_thai_tokenizer")
    bpe, ext = os.path.join(work, "thai_bpe"), os.path.join(work, "phi3_thai")
    if os.path.isfile(os.path.join(ext, "vocab_map.json")):
        return bpe, ext
    os.makedirs(work, exist_ok=True)
    src = os.path.join(shared_dir, "data", "thai", "thaigov_v2.valid.jsonl.gz")
    slice_path = os.path.join(work, "thai_slice.jsonl.gz")
    with gzip.open(src, "rt", encoding="utf-8") as f, gzip.open(slice_path, "wt", encoding="utf-8") as g:
        for line in itertools.islice(f, 120):
            g.write(line)
    out = run_cmd([sys.executable, os.path.join(TOOLS, "train_tokenizer.py"), "--input", slice_path,
                   "--vocab-size", str(vocab), "--clean", "thaigov", "--threads", "1", "--quiet",
                   "--out", bpe])
    assert "train_tokenizer: BPE vocab" in out.stdout
    out = run_cmd([sys.executable, os.path.join(TOOLS, "extend_tokenizer.py"), "--base",
                   os.path.join(shared_dir, "tokenizers", "phi3"), "--add", bpe, "--target-vocab",
                   str(target), "--threads", "1", "--out", ext])
    assert f"= {target} ids" in out.stdout
    return bpe, ext


@pytest.fixture(scope="module")
def tiny_tok(tmp_path_factory, shared_dir):
    return make_tiny_thai_tokenizer(tmp_path_factory, shared_dir)


def _lines(path, n):
    return list(itertools.islice(T.iter_lines(path), n))


@pytest.fixture(scope="module")
def samples(shared_dir):
    return {
        "thai": _lines(os.path.join(shared_dir, "data", "thai", "thaigov_v2.test.jsonl.gz"), 300),
        "english": _lines(os.path.join(shared_dir, "data", "english", "enwiki.valid.jsonl.gz"), 300),
    }


def test_tokens_per_char_reproduces_reference_numbers(shared_dir):
    """shared/README.md: on NTREX-128 Phi-3 1.020/0.246, Qwen2 0.535/0.214, Llama-3 0.457/0.211."""
    expected = {"phi3": (1.020, 0.246), "qwen2": (0.535, 0.214), "llama3": (0.457, 0.211)}
    texts = [os.path.join(shared_dir, "data", "eval", f"ntrex128.{lang}.txt") for lang in ("tha", "eng")]
    args = [sys.executable, os.path.join(TOOLS, "tokens_per_char.py")]
    for name in expected:
        args += ["--tokenizer", name]
    for t in texts:
        args += ["--text", t]
    out = run_cmd(args).stdout
    rows = {line.split("|")[1].strip(): line.split("|")[2:-1] for line in out.splitlines()
            if line.startswith("| ") and not line.startswith("| tokenizer")}
    for name, (tha, eng) in expected.items():
        assert float(rows[name][0]) == pytest.approx(tha, abs=5e-4), (name, rows[name])
        assert float(rows[name][2]) == pytest.approx(eng, abs=5e-4), (name, rows[name])
    assert "tokens_per_char: 3 tokenizers x 2 texts (3,994 lines)" in out


def test_clean_and_split():
    doc = ("รัฐบาลไทย-ข่าวทำเนียบรัฐบาล-นายกฯ ประชุม\n\n\nวันจันทร์ที่ 24 สิงหาคม 2563\nพิมพ์\n"
           "นายกฯ ประชุม\nเนื้อหา ข่าว\n--------------------\nที่มา : https://www.thaigov.go.th/news/1")
    assert T.clean_thaigov(doc) == "นายกฯ ประชุม\nเนื้อหา ข่าว"
    chunks = list(T.split_sentences("ก" * 30 + " " + "ข" * 30 + "\n\n" + "ค" * 70, max_chars=40))
    assert chunks == ["ก" * 30, "ข" * 30, "ค" * 40, "ค" * 30]


def test_extended_vocabulary_layout(tiny_tok, shared_dir):
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2

    Piece = sp_pb2.ModelProto.SentencePiece
    _, ext = tiny_tok
    base = T.load_base_tokenizer(os.path.join(shared_dir, "tokenizers", "phi3"))
    merged = T.read_model_proto(os.path.join(ext, "tokenizer.model"))
    pieces = [p.piece for p in merged.pieces]
    assert len(pieces) == 32011 + EXTRA_IDS
    assert len(set(pieces)) == len(pieces), "duplicate pieces"
    assert pieces[:32000] == [p.piece for p in base.proto.pieces]
    with open(os.path.join(shared_dir, "tokenizers", "phi3", "added_tokens.json")) as f:
        for content, sid in json.load(f).items():
            assert pieces[sid] == content and merged.pieces[sid].type == Piece.USER_DEFINED
    added = merged.pieces[32011:]
    assert all(p.type == Piece.NORMAL and T.is_thai_piece(p.piece) for p in added)
    scores = [p.score for p in added]
    assert max(scores) < min(p.score for p in base.proto.pieces if p.type == Piece.NORMAL)
    assert all(a > b for a, b in zip(scores, scores[1:])), "added scores must strictly decrease"
    assert T.unreachable_pieces(merged, 32011, threads=1) == [], "an added piece can never be emitted"
    vmap = T.load_vocab_map(ext)
    assert vmap["old_to_new"] == list(range(32011)) and vmap["vocab_size"] == 32011 + EXTRA_IDS
    # the HF side carries Phi-3's chat template and specials
    with open(os.path.join(ext, "tokenizer_config.json")) as f:
        cfg = json.load(f)
    assert cfg["chat_template"] == base.config["chat_template"]
    assert cfg["added_tokens_decoder"]["32010"]["content"] == "<|user|>"
    sp = spm.SentencePieceProcessor(model_file=os.path.join(ext, "tokenizer.model"))
    assert sp.encode("<|user|>hi<|end|>")[1:2] == [32010]


def test_english_unchanged_thai_shorter(tiny_tok, shared_dir, samples):
    import sentencepiece as spm

    _, ext = tiny_tok
    base = spm.SentencePieceProcessor(
        model_file=os.path.join(shared_dir, "tokenizers", "phi3", "tokenizer.model"))
    new = spm.SentencePieceProcessor(model_file=os.path.join(ext, "tokenizer.model"))
    assert new.encode(samples["english"]) == base.encode(samples["english"])
    n_base = sum(map(len, base.encode(samples["thai"])))
    n_new = sum(map(len, new.encode(samples["thai"])))
    assert n_new < 0.6 * n_base, (n_new, n_base)


def test_sentencepiece_and_hf_encode_identically(tiny_tok, samples):
    import sentencepiece as spm
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    _, ext = tiny_tok
    sp = spm.SentencePieceProcessor(model_file=os.path.join(ext, "tokenizer.model"))
    fast = Tokenizer.from_file(os.path.join(ext, "tokenizer.json"))
    auto = AutoTokenizer.from_pretrained(ext)
    specials = ["Hello <|user|> สวัสดีครับ<|end|>\n<|assistant|> ok  two  spaces",
                "ข่าว<|endoftext|>", "a\tb\n\nc 😀 ภาษาไทย  ", "x<|system|> <|placeholder3|>y"]
    texts = samples["thai"] + samples["english"] + specials
    expect = sp.encode(texts)
    assert [e.ids for e in fast.encode_batch(texts, add_special_tokens=False)] == expect
    assert [auto(t, add_special_tokens=False)["input_ids"] for t in texts] == expect
    measured = T.load_text_encoder(ext)  # what tokens_per_char uses for an HF directory
    assert measured.kind == "hf" and measured.encode_batch(texts) == expect
    assert auto("ภาษาไทย")["input_ids"] == sp.encode("ภาษาไทย", add_bos=True)
    assert auto.decode(expect[-3]) == sp.decode(expect[-3])
    # Known, documented difference: at the very start of a text, sentencepiece's dummy prefix
    # yields a lone "▁" before a special token or a leading space; HF (like Phi-3's) does not.
    assert sp.encode("<|user|>x")[0] == sp.piece_to_id("\u2581")
    assert auto("<|user|>x", add_special_tokens=False)["input_ids"] == sp.encode("<|user|>x")[1:]
    chat = auto.apply_chat_template([{"role": "user", "content": "สวัสดี"}], tokenize=True)
    chat = chat["input_ids"] if isinstance(chat, dict) or hasattr(chat, "keys") else chat
    assert chat[:2] == [1, 32010] and chat[-2:] == [32001, 13]


def make_english_base_tokenizers(tmp_path_factory, shared_dir, vocab=600, target=1200):
    """A base tokenizer other than Phi-3's: an English BPE of its own with Phi-3's special tokens
    and chat template (trained on a slice of enwiki valid), and its extension by the tiny Thai BPE
    to ``target`` ids, both through the CLIs, once per test session. Returns (base, extended)."""
    from megatron_jai import cli

    work = str(tmp_path_factory.getbasetemp() / "english_base_tokenizer")
    base, ext = os.path.join(work, "english_base"), os.path.join(work, "english_thai")
    if os.path.isfile(os.path.join(ext, "vocab_map.json")):
        return base, ext
    bpe, _ = make_tiny_thai_tokenizer(tmp_path_factory, shared_dir)
    os.makedirs(work, exist_ok=True)
    slice_path = os.path.join(work, "english_slice.jsonl")
    with open(slice_path, "w", encoding="utf-8") as g:
        g.writelines(json.dumps({"text": t}) + "\n" for t in _lines(
            os.path.join(shared_dir, "data", "english", "enwiki.valid.jsonl.gz"), 400))
    assert cli.run("train_tokenizer.py", load_tool("train_tokenizer").main, [
        "--input", slice_path, "--vocab-size", str(vocab), "--threads", "1", "--quiet",
        "--special-tokens-from", "phi3", "--out", base]) == 0
    assert cli.run("extend_tokenizer.py", load_tool("extend_tokenizer").main, [
        "--base", base, "--add", bpe, "--target-vocab", str(target), "--threads", "1",
        "--out", ext]) == 0
    return base, ext


def test_other_base_tokenizer_with_phi3_chat_format(tmp_path_factory, shared_dir, samples):
    """train_tokenizer --special-tokens-from phi3 stacks Phi-3's 11 special tokens right above an
    English BPE's own pieces with Phi-3's chat template; that tokenizer is a base that
    extend_tokenizer grows to about twice its size: base ids and English encodings kept, specials
    kept, chat turns rendered with the special ids."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    from megatron_jai.data.tokenizer import load_tokenizer

    base, ext = make_english_base_tokenizers(tmp_path_factory, shared_dir)
    phi3 = T.load_base_tokenizer("phi3")
    with open(os.path.join(base, "added_tokens.json")) as f:
        added = json.load(f)
    assert added == {c: 600 + i - 32000 for c, i in phi3.specials.items()}
    with open(os.path.join(base, "tokenizer_config.json")) as f:
        cfg = json.load(f)
    assert cfg["chat_template"] == phi3.config["chat_template"] and cfg["eos_token"] == "<|endoftext|>"
    assert "padded_vocab_size" not in cfg and "model_max_length" not in cfg
    assert {int(i): t["content"] for i, t in cfg["added_tokens_decoder"].items()} == \
        {i: c for c, i in added.items()}
    tok = load_tokenizer(base)
    assert tok.vocab_size == 611 and tok.eod == added["<|endoftext|>"]

    merged = T.read_model_proto(os.path.join(ext, "tokenizer.model"))
    assert len(merged.pieces) == 1200
    assert [p.piece for p in merged.pieces[:600]] == [p.piece for p in T.read_model_proto(
        os.path.join(base, "tokenizer.model")).pieces]
    assert {merged.pieces[i].piece: i for i in range(600, 611)} == added
    assert all(T.is_thai_piece(p.piece) for p in merged.pieces[611:])
    assert T.load_vocab_map(ext)["old_to_new"] == list(range(611))
    sp_base = spm.SentencePieceProcessor(model_file=os.path.join(base, "tokenizer.model"))
    sp_ext = spm.SentencePieceProcessor(model_file=os.path.join(ext, "tokenizer.model"))
    assert sp_ext.encode(samples["english"]) == sp_base.encode(samples["english"])
    assert sum(map(len, sp_ext.encode(samples["thai"]))) < 0.6 * sum(map(len, sp_base.encode(samples["thai"])))
    auto = AutoTokenizer.from_pretrained(ext)
    chat = auto.apply_chat_template([{"role": "user", "content": "สวัสดี"},
                                     {"role": "assistant", "content": "hi"}], tokenize=True)
    chat = chat["input_ids"] if isinstance(chat, dict) or hasattr(chat, "keys") else chat
    assert chat[:2] == [1, added["<|user|>"]] and added["<|assistant|>"] in chat
    assert chat[-2:] == [added["<|end|>"], sp_base.piece_to_id("<0x0A>")]


def test_merge_drops_unreachable_pieces(shared_dir):
    base = T.load_base_tokenizer(os.path.join(shared_dir, "tokenizers", "phi3"))
    # "ฬฦฬ" can only be built from "ฬฦ" or "ฦฬ", neither of which is a piece: never emitted.
    cands = ["ฬ", "ฦ", "ฬฦฬ", "ฦฦ", "ฬฬ"]
    proto, dropped, rounds = T.merge_pieces(base, cands, 4, threads=1)
    added = [p.piece for p in proto.pieces[32011:]]
    assert added == ["ฬ", "ฦ", "ฦฦ", "ฬฬ"] and dropped == 1 and rounds == 2
    with pytest.raises(ValueError, match="only 4 usable new pieces"):
        T.merge_pieces(base, cands, 5, threads=1)


def test_cli_errors(tmp_path, tiny_tok, shared_dir, capsys):
    bpe, ext = tiny_tok
    bad_jsonl = tmp_path / "bad.jsonl"
    bad_jsonl.write_text('{"text": "ok"}\nnot json\n')
    cases = [
        (["train_tokenizer", "--input", tmp_path / "nope.jsonl", "--vocab-size", "500", "--out",
          tmp_path / "o1"], "no such file", tmp_path / "o1"),
        (["extend_tokenizer", "--add", bpe, "--target-vocab", "32000", "--out", tmp_path / "o2"],
         "must exceed the base vocabulary", tmp_path / "o2"),
        (["extend_tokenizer", "--add", bpe, "--target-vocab", "40000", "--out", tmp_path / "o3"],
         "usable new pieces", tmp_path / "o3"),
        (["extend_tokenizer", "--add", bpe, "--target-vocab", "32100", "--out", ext], "exists", None),
        (["tokens_per_char", "--tokenizer", tmp_path, "--text",
          os.path.join(shared_dir, "data", "eval", "ntrex128.eng.txt")], "no tokenizer.json", None),
        (["tokens_per_char", "--tokenizer", "phi3", "--text", bad_jsonl], "bad.jsonl:2: not JSON",
         None),
    ]
    for (tool, *args), message, out in cases:
        err = run_tool(capsys, tool, *args, expect_rc=2)[1].strip().splitlines()
        assert err[-1].startswith(f"{tool}.py: error:") and message in err[-1], err
        if out is not None:
            assert not os.path.exists(out)
    assert sorted(os.listdir(tmp_path)) == ["bad.jsonl"], "output left behind"
