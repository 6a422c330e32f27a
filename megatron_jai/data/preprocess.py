"""JSON lines (plain or gzip) -> a Megatron-Core indexed dataset ``PREFIX.bin`` / ``PREFIX.idx``.

* one document per line, its text in any field (``text_key``; ``a.b`` reaches a nested field);
* bad lines are counted by reason, the first few reported with ``file:line``, and skipped:
  ``not_json`` (not parseable, or not UTF-8), ``missing_field`` (not an object, or no such field),
  ``not_string`` (the field is not a string), ``empty`` (blank line or whitespace-only text); more
  than ``max_bad_fraction`` of them (default 1%) is an error (a wrong ``text_key``, a wrong file);
* the end-of-document token is appended to every document (``append_eod``);
* worker processes tokenize chunks of lines while the parent writes them in input order, so the
  output does not depend on the number of workers; a worker that dies (the OOM killer, a signal)
  is an error, not a hang;
* the output is Megatron-Core's indexed dataset (``MMIDIDX`` ``.idx`` + raw ``.bin``, read by its
  ``IndexedDataset``), written here without importing ``megatron.core``: its package import pulls
  in the optimizer, DDP and FSDP, seconds of start-up for a tool that needs none of them (the tests
  check the bytes against Megatron-Core's ``IndexedDatasetBuilder``);
* atomic: everything is written under temporary names and renamed at the end; on any error or
  interrupt the temporaries are removed and no ``PREFIX.bin/.idx`` appears (an existing pair is
  only replaced with ``overwrite=True``).

Next to the pair, ``PREFIX.meta.json`` records the tokenizer (path, vocab size, EOD) and the counts,
so training can refuse a dataset made with another vocabulary.
"""
from __future__ import annotations

import collections
import gzip
import json
import multiprocessing
import os
import signal
import struct
import sys
import time
import zlib
from array import array
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy

from megatron_jai.cli import UserError
from megatron_jai.data.files import iter_lines
from megatron_jai.data.tokenizer import load_tokenizer

BAD_LINE_REASONS = ("not_json", "missing_field", "not_string", "empty")
CHUNK_LINES = 256
MAX_REPORTED_BAD_LINES = 10
DEFAULT_MAX_BAD_FRACTION = 0.01
# Test hook: a pool worker that reaches this input line kills itself (as the OOM killer would).
KILL_WORKER_AT_ENV = "JAI_TEST_KILL_WORKER_AT"


class PreprocessError(UserError):
    """Bad input for preprocessing (one-line message, meant for the user)."""


@dataclass
class PreprocessStats:
    output_prefix: str
    documents: int = 0
    tokens: int = 0
    lines: int = 0
    bad_lines: Dict[str, int] = field(default_factory=lambda: {r: 0 for r in BAD_LINE_REASONS})
    bad_line_examples: List[str] = field(default_factory=list)  # "file:line: reason"
    input_bytes: int = 0
    seconds: float = 0.0
    vocab_size: int = 0
    eod: int = -1
    dtype: str = ""

    @property
    def num_bad_lines(self) -> int:
        return sum(self.bad_lines.values())

    def summary(self) -> str:
        bad = ", ".join(f"{r} {n}" for r, n in self.bad_lines.items() if n) or "none"
        rate = self.tokens / max(self.seconds, 1e-9)
        return (f"preprocessed {self.documents:,} documents, {self.tokens:,} tokens "
                f"({self.dtype}) from {self.lines:,} lines; bad lines {self.num_bad_lines:,} "
                f"({bad}); {self.seconds:.1f} s ({rate:,.0f} tokens/s) -> "
                f"{self.output_prefix}.bin/.idx")


def index_dtype(vocab_size: int):
    """The token dtype Megatron-Core itself picks for a vocabulary (``DType.optimal_dtype``:
    uint16 below 65,500 ids, else int32)."""
    return numpy.uint16 if vocab_size < 65500 else numpy.int32


# Megatron-Core's IndexedDataset format: .idx = header, version 1, dtype code, counts, then
# per-sequence lengths (int32) and byte offsets (int64), and the document boundaries (int64).
_INDEX_HEADER = b"MMIDIDX\x00\x00"
_DTYPE_CODES = {numpy.uint16: 8, numpy.int32: 4}


class _IndexedDatasetWriter:
    """Streams documents (one sequence each) into ``PREFIX.bin``; :meth:`finalize` writes the
    ``.idx``. Byte-identical to Megatron-Core's ``IndexedDatasetBuilder``."""

    def __init__(self, bin_path: str, dtype):
        self.dtype = numpy.dtype(dtype)
        self._bin = open(bin_path, "wb")
        self._lengths = array("i")

    def add_document(self, tokens: numpy.ndarray) -> None:
        self._bin.write(tokens.astype(self.dtype, copy=False).tobytes(order="C"))
        self._lengths.append(tokens.size)

    def finalize(self, idx_path: str) -> None:
        self._bin.close()
        lengths = numpy.frombuffer(self._lengths, dtype=numpy.int32)
        pointers = numpy.zeros(len(lengths), dtype=numpy.int64)
        numpy.cumsum(lengths[:-1], out=pointers[1:])
        with open(idx_path, "wb") as f:
            f.write(_INDEX_HEADER + struct.pack("<QB", 1, _DTYPE_CODES[self.dtype.type]))
            f.write(struct.pack("<QQ", len(lengths), len(lengths) + 1))
            f.write(lengths.tobytes())
            f.write((pointers * self.dtype.itemsize).tobytes())
            f.write(numpy.arange(len(lengths) + 1, dtype=numpy.int64).tobytes())

    def close(self) -> None:
        self._bin.close()


def output_paths(prefix: str) -> Tuple[str, str, str]:
    """``(PREFIX.bin, PREFIX.idx, PREFIX.meta.json)``."""
    return f"{prefix}.bin", f"{prefix}.idx", f"{prefix}.meta.json"


def read_meta(prefix: str) -> Optional[dict]:
    """The ``PREFIX.meta.json`` written by :func:`preprocess`, or None for datasets made elsewhere."""
    path = output_paths(prefix)[2]
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


# ---- worker side (runs in the pool processes; state set once by _init_worker) ------------------
_worker: dict = {}


def _init_worker(tokenizer_path: str, text_key: str, append_eod: bool, dtype_name: str,
                 in_pool: bool = False) -> None:
    if in_pool:
        # Ctrl-C reaches the whole process group: only the parent handles it (it terminates the
        # pool and removes the temporaries); workers would each print a KeyboardInterrupt trace.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    tok = load_tokenizer(tokenizer_path)
    _worker.update(tokenizer=tok, text_key=text_key, append_eod=append_eod,
                   dtype=numpy.dtype(dtype_name),
                   kill_at=int(os.environ.get(KILL_WORKER_AT_ENV, 0)) if in_pool else 0)


def _extract_text(line: bytes, text_key: str) -> Tuple[Optional[str], Optional[str]]:
    """(text, None) for a good line, (None, reason) for a bad one."""
    if not line.strip():
        return None, "empty"
    try:
        obj = json.loads(line)
    except ValueError:  # JSONDecodeError and UnicodeDecodeError
        return None, "not_json"
    value = obj
    keys = [text_key] if isinstance(obj, dict) and text_key in obj else text_key.split(".")
    for key in keys:
        if not isinstance(value, dict) or key not in value:
            return None, "missing_field"
        value = value[key]
    if not isinstance(value, str):
        return None, "not_string"
    if not value.strip():
        return None, "empty"
    return value, None


def _encode_chunk(chunk: Tuple[int, int, int, List[bytes]]):
    """Tokenize one chunk: returns (chunk tag, progress, documents as arrays, bad (line, reason))."""
    file_index, first_line, progress, lines = chunk
    if first_line <= _worker["kill_at"] < first_line + len(lines):
        os.kill(os.getpid(), signal.SIGKILL)
    texts, bad = [], []
    for offset, line in enumerate(lines):
        text, reason = _extract_text(line, _worker["text_key"])
        if reason:
            bad.append((first_line + offset, reason))
        else:
            texts.append(text)
    tok, dtype = _worker["tokenizer"], _worker["dtype"]
    docs = []
    for ids in tok.encode_batch(texts) if texts else []:
        if _worker["append_eod"]:
            ids = list(ids) + [tok.eod]
        if ids:
            docs.append(numpy.asarray(ids, dtype=dtype))
    return file_index, progress, docs, bad


# ---- parent side -------------------------------------------------------------------------------
def _chunks(inputs: Sequence[str], stats: PreprocessStats) -> Iterator[tuple]:
    base = 0
    for file_index, path in enumerate(inputs):
        lines, first, line_no, pos = [], 1, 0, 0
        try:
            for line, pos in iter_lines(path):
                line_no += 1
                lines.append(line)
                if len(lines) == CHUNK_LINES:
                    yield file_index, first, base + pos, lines
                    lines, first = [], line_no + 1
        except (EOFError, gzip.BadGzipFile, zlib.error, OSError) as err:
            raise PreprocessError(f"{path}: unreadable after line {line_no} "
                                  f"(truncated or corrupt file: {err})") from None
        if lines:
            yield file_index, first, base + pos, lines
        stats.lines += line_no
        base += os.path.getsize(path)


def _remove(paths) -> None:
    for p in paths:
        try:
            os.remove(p)
        except FileNotFoundError:
            pass


def _pool_results(chunks: Iterator[tuple], workers: int, init_args: tuple) -> Iterator[tuple]:
    """``_encode_chunk`` over ``chunks`` in ``workers`` spawned processes, results in input order,
    at most ``2 * workers`` chunks in flight (memory stays bounded on any input size). A worker that
    dies breaks the pool: :class:`PreprocessError` instead of a hang."""
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_init_worker, initargs=(*init_args, True))
    pending = collections.deque()
    try:
        for chunk in chunks:
            pending.append(pool.submit(_encode_chunk, chunk))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    except BrokenProcessPool:
        raise PreprocessError("a tokenizer worker process died (killed by the out-of-memory "
                              "killer or a signal?); no output written. Rerun with fewer "
                              "--workers or more memory") from None
    finally:
        # On an error or Ctrl-C: drop queued chunks; running ones are short and end on their own.
        pool.shutdown(wait=not pending, cancel_futures=True)


def preprocess(inputs: Sequence[str], output_prefix: str, tokenizer_path: str,
               text_key: str = "text", workers: int = 1, append_eod: bool = True,
               overwrite: bool = False, progress: bool = True, log=None,
               max_bad_fraction: float = DEFAULT_MAX_BAD_FRACTION) -> PreprocessStats:
    """Tokenize JSON-lines ``inputs`` into ``output_prefix.bin/.idx`` (see the module docstring).

    Args:
        inputs: JSON-lines files, plain or gzip (detected from the content, not the name).
        output_prefix: output path without extension; its directory is created.
        tokenizer_path: anything :func:`megatron_jai.data.tokenizer.load_tokenizer` accepts.
        text_key: the field holding the document text (``a.b`` for nested objects).
        workers: tokenizer processes (1 = in this process).
        append_eod: append the tokenizer's end-of-document id to every document.
        overwrite: replace an existing ``output_prefix.bin/.idx``.
        progress: show progress (bytes of input read; a bar on a terminal).
        log: callable for warnings about bad lines (default: print to stderr).
        max_bad_fraction: fail when more than this fraction of the input lines is bad (1 = never).

    Returns:
        :class:`PreprocessStats`: documents, tokens (EOD included), lines, bad lines by reason.

    Raises:
        PreprocessError / TokenizerError (both ``ValueError``): missing inputs, existing output,
        unreadable tokenizer, truncated gzip, no usable document, too many bad lines, a worker
        process that died. Nothing is left on disk then.
    """
    from megatron_jai.cli import progress as progress_bar

    if log is None:
        def log(msg):
            print(msg, file=sys.stderr)

    inputs = [os.fspath(p) for p in inputs]
    if not inputs:
        raise PreprocessError("no input files given")
    for path in inputs:
        if not os.path.isfile(path):
            raise PreprocessError(f"input file {path!r} does not exist")
    if workers < 1:
        raise PreprocessError(f"workers must be >= 1, got {workers}")
    if not 0 <= max_bad_fraction <= 1:
        raise PreprocessError(f"the maximum fraction of bad lines must lie in [0, 1], got "
                              f"{max_bad_fraction}")
    bin_path, idx_path, meta_path = output_paths(output_prefix)
    if not overwrite and (os.path.exists(bin_path) or os.path.exists(idx_path)):
        raise PreprocessError(f"output {output_prefix}.bin/.idx exists (use --force to replace it)")
    tokenizer = load_tokenizer(tokenizer_path)  # in the parent too: fail early, learn the vocab
    dtype = numpy.dtype(index_dtype(tokenizer.vocab_size))

    out_dir = os.path.dirname(os.path.abspath(output_prefix))
    os.makedirs(out_dir, exist_ok=True)
    tag = f".tmp{os.getpid()}"
    tmp_paths = [bin_path + tag, idx_path + tag, meta_path + tag]
    stats = PreprocessStats(output_prefix=output_prefix, vocab_size=tokenizer.vocab_size,
                            eod=tokenizer.eod, dtype=dtype.name)
    stats.input_bytes = sum(os.path.getsize(p) for p in inputs)
    init_args = (tokenizer_path, text_key, append_eod, dtype.name)
    start = time.time()
    writer = _IndexedDatasetWriter(tmp_paths[0], dtype)
    results = None
    try:
        if workers > 1:
            results = _pool_results(_chunks(inputs, stats), workers, init_args)
        else:
            _init_worker(*init_args)
            results = map(_encode_chunk, _chunks(inputs, stats))
        with progress_bar(total=stats.input_bytes, unit="B", unit_scale=True, enabled=progress,
                          desc="preprocess") as bar:
            for file_index, position, docs, bad in results:
                for doc in docs:
                    writer.add_document(doc)
                    stats.tokens += int(doc.size)
                stats.documents += len(docs)
                for line_no, reason in bad:
                    stats.bad_lines[reason] += 1
                    if len(stats.bad_line_examples) < MAX_REPORTED_BAD_LINES:
                        example = f"{inputs[file_index]}:{line_no}: {reason}"
                        stats.bad_line_examples.append(example)
                        log(f"warning: skipped bad line {example}")
                bar.update(position - bar.n)
        if stats.documents == 0:
            raise PreprocessError(f"no usable documents in {', '.join(inputs)} "
                                  f"(field {text_key!r}; {stats.num_bad_lines} bad lines)")
        if stats.num_bad_lines > max_bad_fraction * stats.lines:
            bad = ", ".join(f"{r} {n:,}" for r, n in stats.bad_lines.items() if n)
            raise PreprocessError(
                f"{stats.num_bad_lines:,} of {stats.lines:,} lines are bad "
                f"({stats.num_bad_lines / stats.lines:.1%}: {bad}), more than the allowed "
                f"{max_bad_fraction:.1%} (--max-bad-fraction); wrong --json-key {text_key!r}? "
                f"No output written")
        writer.finalize(tmp_paths[1])
        stats.seconds = time.time() - start
        meta = {"tokenizer": os.path.abspath(tokenizer_path), "tokenizer_kind": tokenizer.kind,
                "inputs": [os.path.abspath(p) for p in inputs], "text_key": text_key,
                "append_eod": append_eod, **asdict(stats)}
        meta.pop("output_prefix")
        with open(tmp_paths[2], "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2)
            f.write("\n")
        # .idx last: Megatron-Core opens a dataset through its .idx, so a pair is never half-new.
        os.replace(tmp_paths[2], meta_path)
        os.replace(tmp_paths[0], bin_path)
        os.replace(tmp_paths[1], idx_path)
        if stats.num_bad_lines > len(stats.bad_line_examples):
            log(f"warning: {stats.num_bad_lines - len(stats.bad_line_examples)} more bad lines "
                f"not listed")
        return stats
    finally:
        if workers > 1 and results is not None:
            results.close()  # stops the pool now, also on an error or Ctrl-C
        writer.close()
        _remove(tmp_paths)
