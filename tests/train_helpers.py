"""Small real training data for the training tests: slices of shared/ Thai news and English
Wikipedia, a 1,000-piece sentencepiece tokenizer trained on them, and indexed datasets made with
the project's own preprocessing. Built once into the cache directory (under a lock), reused by every
training test and process."""
from __future__ import annotations

import gzip
import io
import json
import os

from megatron_jai.data.files import default_cache_dir, file_lock

VOCAB = 1000  # fits the ``tiny`` preset (1,024 ids)
DOCS = {"english": ("data/english/enwiki.train.jsonl.gz", 60),
        "thai": ("data/thai/thaigov_v2.train.jsonl.gz", 300)}


def _slice(src: str, dst: str, docs: int) -> None:
    with gzip.open(src, "rt", encoding="utf-8") as f, open(dst + ".tmp", "w", encoding="utf-8") as out:
        for i, line in enumerate(f):
            if i >= docs:
                break
            out.write(json.dumps({"text": json.loads(line)["text"]}, ensure_ascii=False) + "\n")
    os.replace(dst + ".tmp", dst)


def small_corpus(shared_dir: str) -> dict:
    """``{"tokenizer": path, "english": prefix, "thai": prefix}``."""
    root = os.path.join(default_cache_dir(), "test_train_corpus_v1")
    done = os.path.join(root, "DONE")
    with file_lock(root + ".lock"):
        if not os.path.isfile(done):
            import sentencepiece as spm

            from megatron_jai.data.preprocess import preprocess

            os.makedirs(root, exist_ok=True)
            texts = []
            for name, (rel, docs) in DOCS.items():
                path = os.path.join(root, f"{name}.jsonl")
                _slice(os.path.join(shared_dir, rel), path, docs)
                with open(path, encoding="utf-8") as f:
                    texts += [json.loads(line)["text"][:4000] for line in f]
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(t for doc in texts for t in doc.split("\n") if t.strip()),
                model_writer=(buf := io.BytesIO()), vocab_size=VOCAB, model_type="unigram",
                character_coverage=0.9995, byte_fallback=True, num_threads=1,
                input_sentence_size=20000, shuffle_input_sentence=True, minloglevel=2)
            with open(os.path.join(root, "tokenizer.model"), "wb") as f:
                f.write(buf.getvalue())
            for name in DOCS:
                preprocess([os.path.join(root, f"{name}.jsonl")], os.path.join(root, name),
                           os.path.join(root, "tokenizer.model"), progress=False, overwrite=True)
            open(done, "w").close()
    return {"tokenizer": os.path.join(root, "tokenizer.model"),
            "english": os.path.join(root, "english"), "thai": os.path.join(root, "thai")}
