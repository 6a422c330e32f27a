"""tools/preprocess_data.py and megatron_jai.data.preprocess: exact counts, bad lines, atomicity."""
import gzip
import json
import os
import sys

import numpy
import pytest

from conftest import REPO_ROOT, run_cmd, run_tool
from megatron_jai.data import PreprocessError, TokenizerError, load_tokenizer, preprocess, read_meta
from megatron_jai.data.demo import ensure_demo_data, generate_documents

TOOL = os.path.join(REPO_ROOT, "tools", "preprocess_data.py")


@pytest.fixture(scope="module")
def demo():
    return ensure_demo_data()


def _good_docs(n, seed=7):
    return list(generate_documents(n, seed=seed))


def _bad_lines():
    """(line, reason) for every kind of bad line."""
    return [
        (b"this is not json", "not_json"),
        (b'{"body": "unterminated', "not_json"),
        (b'{"body": "caf\xe9"}', "not_json"),  # Latin-1 byte: not UTF-8
        (b"", "empty"),
        (b"   ", "empty"),
        (b'{"body": "   \\n  "}', "empty"),
        (b'{"title": "no body"}', "missing_field"),
        (b"[1, 2, 3]", "missing_field"),
        (b'{"body": 42}', "not_string"),
        (b'{"body": null}', "not_string"),
    ]


def _write_mixed(path, docs, key="body"):
    """Good documents interleaved with bad lines; returns the expected bad (line_no, reason)."""
    bad = _bad_lines()
    lines, expected_bad = [], []
    for i, doc in enumerate(docs):
        lines.append(json.dumps({key: doc, "id": i}).encode())
        if i % 3 == 0 and bad:
            line, reason = bad.pop(0)
            lines.append(line)
            expected_bad.append((len(lines), reason))
    with gzip.open(path, "wb") as f:
        f.write(b"\n".join(lines) + b"\n")
    return expected_bad


def _read_documents(prefix):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix)
    return [numpy.asarray(ds[i]).tolist() for i in range(len(ds))]


@pytest.mark.dist
def test_good_and_bad_lines_exact_counts(tmp_path, demo):
    docs = _good_docs(40)
    src = tmp_path / "mixed.jsonl.gz"
    expected_bad = _write_mixed(src, docs)
    out = tmp_path / "out" / "mixed"
    proc = run_cmd([sys.executable, TOOL, "--input", str(src), "--output-prefix", str(out),
                    "--tokenizer", demo.tokenizer_path, "--json-key", "body", "--workers", "2",
                    "--max-bad-fraction", "0.2"])
    tok = load_tokenizer(demo.tokenizer_path)
    expected = [tok.encode(d) + [tok.eod] for d in docs]
    n_tokens = sum(map(len, expected))
    summary = proc.stdout.strip().splitlines()[-1]
    assert f"preprocessed {len(docs):,} documents, {n_tokens:,} tokens" in summary, summary
    assert f"bad lines {len(expected_bad)} " in summary, summary
    assert "not_json 3, missing_field 2, not_string 2, empty 3" in summary, summary
    # every bad line is reported with file:line and reason
    for line_no, reason in expected_bad:
        assert f"{src}:{line_no}: {reason}" in proc.stderr, proc.stderr
    # the dataset holds exactly the good documents, each ending in EOD, in input order
    assert _read_documents(str(out)) == expected
    meta = read_meta(str(out))
    assert (meta["documents"], meta["tokens"], meta["vocab_size"], meta["eod"]) == \
        (len(docs), n_tokens, 1024, tok.eod)
    assert meta["bad_lines"] == {"not_json": 3, "missing_field": 2, "not_string": 2, "empty": 3}
    assert sorted(os.listdir(out.parent)) == ["mixed.bin", "mixed.idx", "mixed.meta.json"]

    # one worker in-process writes the same bytes as two worker processes
    stats = preprocess([str(src)], str(tmp_path / "serial"), demo.tokenizer_path, text_key="body",
                       workers=1, progress=False, log=lambda m: None, max_bad_fraction=0.2)
    assert (stats.documents, stats.tokens, stats.num_bad_lines) == \
        (len(docs), n_tokens, len(expected_bad))
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"serial{ext}").read_bytes() == (out.parent / f"mixed{ext}").read_bytes()


def test_nested_field_no_eod_and_several_inputs(tmp_path, demo):
    docs = _good_docs(6, seed=11)
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"  # plain, not gzip
    a.write_text("".join(json.dumps({"doc": {"text": d}}) + "\n" for d in docs[:4]))
    b.write_text("".join(json.dumps({"doc": {"text": d}}) + "\n" for d in docs[4:]))
    stats = preprocess([str(a), str(b)], str(tmp_path / "n"), demo.tokenizer_path,
                       text_key="doc.text", append_eod=False, progress=False)
    tok = load_tokenizer(demo.tokenizer_path)
    assert _read_documents(str(tmp_path / "n")) == [tok.encode(d) for d in docs]
    assert stats.lines == 6 and stats.num_bad_lines == 0


def _no_outputs(directory, prefix):
    return [f for f in os.listdir(directory) if f.startswith(prefix)] == []


def test_truncated_gzip_leaves_nothing(tmp_path, demo, capsys):
    # > 1 chunk of good lines first, so data has been written when the stream breaks
    docs = _good_docs(700, seed=3)
    full = gzip.compress("".join(json.dumps({"text": d}) + "\n" for d in docs).encode())
    src = tmp_path / "cut.jsonl.gz"
    src.write_bytes(full[: int(len(full) * 0.8)])
    err = run_tool(capsys, "preprocess_data", "--input", src, "--output-prefix", tmp_path / "cut",
                   "--tokenizer", demo.tokenizer_path, "--workers", "1", "--no-progress",
                   expect_rc=2)[1].strip().splitlines()
    assert len(err) == 1 and err[0].startswith("preprocess_data.py: error: ") and \
        "truncated or corrupt" in err[0], err
    assert sorted(os.listdir(tmp_path)) == ["cut.jsonl.gz"]


def test_user_errors_are_one_line_and_write_nothing(tmp_path, demo):
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"text": "a small document"}) + "\n")
    allbad = tmp_path / "allbad.jsonl"
    allbad.write_text("nope\n{\"other\": 1}\n\n")
    with pytest.raises(PreprocessError, match="does not exist"):
        preprocess([str(tmp_path / "missing.jsonl")], str(tmp_path / "x"), demo.tokenizer_path)
    with pytest.raises(TokenizerError):
        preprocess([str(good)], str(tmp_path / "x"), str(tmp_path / "no_tokenizer"))
    with pytest.raises(TokenizerError):
        preprocess([str(good)], str(tmp_path / "x"), str(good))  # not a sentencepiece model
    with pytest.raises(PreprocessError, match="no usable documents"):
        preprocess([str(allbad)], str(tmp_path / "x"), demo.tokenizer_path, progress=False,
                   log=lambda m: None)
    assert _no_outputs(tmp_path, "x")
    # an existing dataset is never replaced without overwrite (--force)
    preprocess([str(good)], str(tmp_path / "keep"), demo.tokenizer_path, progress=False)
    before = (tmp_path / "keep.bin").read_bytes()
    with pytest.raises(PreprocessError, match="exists"):
        preprocess([str(allbad)], str(tmp_path / "keep"), demo.tokenizer_path, progress=False)
    assert (tmp_path / "keep.bin").read_bytes() == before
    # ... and a failing overwrite leaves the old one intact
    with pytest.raises(PreprocessError):
        preprocess([str(allbad)], str(tmp_path / "keep"), demo.tokenizer_path, overwrite=True,
                   progress=False, log=lambda m: None)
    assert (tmp_path / "keep.bin").read_bytes() == before
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]


def test_writer_matches_megatron_builder(tmp_path):
    """The .bin/.idx written without megatron.core are Megatron-Core's own bytes (both dtypes)."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from megatron_jai.data.preprocess import _IndexedDatasetWriter, index_dtype

    rng = numpy.random.default_rng(0)
    for vocab in (1000, 70000):
        dtype = index_dtype(vocab)
        docs = [rng.integers(0, vocab, rng.integers(1, 50)).astype(dtype) for _ in range(30)]
        ours, ref = tmp_path / f"ours{vocab}", tmp_path / f"ref{vocab}"
        writer = _IndexedDatasetWriter(f"{ours}.bin", dtype)
        builder = IndexedDatasetBuilder(f"{ref}.bin", dtype=dtype)
        for doc in docs:
            writer.add_document(doc)
            builder.add_document(doc, [doc.size])
        writer.finalize(f"{ours}.idx")
        builder.finalize(f"{ref}.idx")
        for ext in (".bin", ".idx"):
            assert (tmp_path / f"ours{vocab}{ext}").read_bytes() == \
                (tmp_path / f"ref{vocab}{ext}").read_bytes(), (vocab, ext)
        assert _read_documents(str(ours)) == [d.tolist() for d in docs]


@pytest.mark.dist
def test_killed_worker_fails_cleanly_and_too_many_bad_lines(tmp_path, demo, capsys):
    """A worker killed mid-run (as by the OOM killer) fails the run with one line instead of
    hanging; more bad lines than --max-bad-fraction (default 1%) is exit 2. No output either way."""
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in _good_docs(700, seed=5)))
    proc = run_cmd([sys.executable, TOOL, "--input", src, "--output-prefix", tmp_path / "killed",
                    "--tokenizer", demo.tokenizer_path, "--workers", "2", "--no-progress"],
                   env={"JAI_TEST_KILL_WORKER_AT": "300"}, check=False, timeout=120)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(err) == 1, proc.stderr
    assert err[0].startswith("preprocess_data.py: error: a tokenizer worker process died"), err
    # 8 bad lines in 708 = 1.1%: refused by default, accepted with a higher limit
    with open(src, "a") as f:
        f.write("not json\n" * 8)
    args = ["--input", src, "--tokenizer", demo.tokenizer_path, "--workers", "1", "--no-progress"]
    err = run_tool(capsys, "preprocess_data", *args, "--output-prefix", tmp_path / "bad",
                   expect_rc=2)[1].strip().splitlines()
    assert err[-1].startswith("preprocess_data.py: error: 8 of 708 lines are bad (1.1%: not_json "
                              "8), more than the allowed 1.0%"), err
    assert sorted(os.listdir(tmp_path)) == ["docs.jsonl"]
    out = run_tool(capsys, "preprocess_data", *args, "--output-prefix", tmp_path / "ok",
                   "--max-bad-fraction", "0.02")[0]
    assert "preprocessed 700 documents" in out
