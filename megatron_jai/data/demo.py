"""The embedded tiny default: a corpus the project writes itself, its tokenizer and its datasets.

``ensure_demo_data()`` generates (deterministically, from the code below) a few MB of English-like
documents from a small grammar with regularities a tiny model learns within a few hundred steps:
recurring story characters, a fixed colour for every object (a "world fact" repeated across
documents), correct small sums, counting and weekday/month sequences. It then trains a 1024-piece
sentencepiece BPE tokenizer on it (``tiny`` has a 1024-row vocabulary) and preprocesses train and
validation splits into Megatron-Core ``.bin/.idx``.

The result is cached under ``<cache_dir>/demo-v<VERSION>`` and reused when complete. Concurrent
callers (e.g. the two ranks of ``torchrun --nproc_per_node 2 pretrain_jai.py``) are safe: the
first takes a file lock and builds into a temporary directory that is renamed into place; the
others wait for the lock and then reuse the result.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass
from typing import Iterator, List, Optional

from megatron_jai.data.files import default_cache_dir, file_lock

VERSION = 2
VOCAB_SIZE = 1024
TRAIN_DOCUMENTS = 6000
VALID_DOCUMENTS = 200
SEED = 20251026


@dataclass(frozen=True)
class DemoData:
    root: str
    tokenizer_path: str  # sentencepiece .model (load with megatron_jai.data.load_tokenizer)
    data_prefix: str  # training .bin/.idx prefix
    valid_prefix: str  # validation .bin/.idx prefix
    vocab_size: int
    eod: int
    train_documents: int
    train_tokens: int
    valid_documents: int
    valid_tokens: int


# ---- the grammar ---------------------------------------------------------------------------------
_SYLLABLES = ["ka", "lo", "mi", "ra", "to", "ne", "si", "bu", "da", "fe", "go", "ha", "ji", "ku",
              "ma", "no", "pa", "ri", "su", "ta", "vi", "wo", "ya", "ze"]
_ANIMALS = ["cat", "dog", "fox", "owl", "bear", "rabbit", "horse", "mouse", "duck", "goat",
            "tiger", "lion", "frog", "bird", "sheep", "wolf", "deer", "turtle", "otter", "crab"]
_OBJECTS = ["ball", "box", "cup", "hat", "book", "kite", "shoe", "lamp", "chair", "bag", "boat",
            "drum", "key", "coat", "bell", "bowl", "car", "flag", "ring", "door", "pen", "map",
            "sock", "clock", "spoon", "basket", "blanket", "bottle", "candle", "window"]
_COLORS = ["red", "blue", "green", "yellow", "white", "black", "orange", "purple", "brown",
           "pink", "grey", "golden"]
_PLACES = ["forest", "village", "river", "garden", "market", "mountain", "lake", "school",
           "farm", "castle", "beach", "city", "valley", "island", "library", "harbor"]
_ADJECTIVES = ["small", "big", "happy", "quiet", "brave", "clever", "kind", "curious", "old",
               "young", "gentle", "busy", "sleepy", "funny", "strong", "shy"]
_VERBS = [("find", "found"), ("carry", "carried"), ("paint", "painted"), ("clean", "cleaned"),
          ("open", "opened"), ("hide", "hid"), ("throw", "threw"), ("fix", "fixed"),
          ("build", "built"), ("draw", "drew"), ("wash", "washed"), ("sell", "sold"),
          ("buy", "bought"), ("lose", "lost"), ("keep", "kept"), ("give", "gave")]
_FOODS = ["bread", "soup", "rice", "apples", "cheese", "fish", "cake", "beans", "honey", "milk"]
_DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
_MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August",
           "September", "October", "November", "December"]
_NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
                 "ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen",
                 "seventeen", "eighteen", "nineteen", "twenty"]


class _World:
    """Facts that hold across the whole corpus (learnable by a tiny model)."""

    def __init__(self, rng: random.Random):
        self.object_color = {o: rng.choice(_COLORS) for o in _OBJECTS}
        self.animal_food = {a: rng.choice(_FOODS) for a in _ANIMALS}
        names = set()
        while len(names) < 120:
            names.add("".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 3))).title())
        self.names = sorted(names)
        self.name_home = {n: rng.choice(_PLACES) for n in self.names}


def _plural(noun: str) -> str:
    return noun + ("es" if noun.endswith(("s", "x", "ch", "sh")) else "s")


def _story(rng: random.Random, w: _World) -> str:
    name, friend = rng.sample(w.names, 2)
    animal = rng.choice(_ANIMALS)
    home = w.name_home[name]
    out = [f"{name} was a {rng.choice(_ADJECTIVES)} {animal} who lived in the {home}."]
    for _ in range(rng.randint(5, 12)):
        kind = rng.randrange(6)
        if kind == 0:
            verb = rng.choice(_VERBS)[1]
            obj = rng.choice(_OBJECTS)
            out.append(f"Every {rng.choice(_DAYS)}, {name} {verb} the {w.object_color[obj]} {obj}.")
        elif kind == 1:
            obj = rng.choice(_OBJECTS)
            a, b = rng.randint(1, 10), rng.randint(1, 10)
            out.append(f"{name} had {_NUMBER_WORDS[a]} {_plural(obj) if a > 1 else obj}. "
                       f"{friend} gave {name} {_NUMBER_WORDS[b]} more, so {name} had "
                       f"{_NUMBER_WORDS[a + b]} {_plural(obj)}.")
        elif kind == 2:
            out.append(f"The {animal} liked to eat {w.animal_food[animal]}, so {name} bought "
                       f"{w.animal_food[animal]} at the market.")
        elif kind == 3:
            place = rng.choice(_PLACES)
            out.append(f"On {rng.choice(_DAYS)}, {name} went to the {place} with {friend}, "
                       f"who lived in the {w.name_home[friend]}.")
        elif kind == 4:
            obj = rng.choice(_OBJECTS)
            out.append(f"{friend} asked {name}: what color is the {obj}? "
                       f"{name} said: the {obj} is {w.object_color[obj]}.")
        else:
            out.append(f"{name} was {rng.choice(_ADJECTIVES)} and {friend} was "
                       f"{rng.choice(_ADJECTIVES)}.")
    out.append(f"At night {name} went back to the {home} and slept.")
    return " ".join(out)


def _sequence(rng: random.Random, w: _World) -> str:
    kind = rng.randrange(3)
    if kind == 0:
        start = rng.randrange(len(_DAYS))
        items = [_DAYS[(start + i) % 7] for i in range(rng.randint(5, 14))]
        return f"The days from {items[0]}: " + ", ".join(items) + "."
    if kind == 1:
        start = rng.randrange(12)
        items = [_MONTHS[(start + i) % 12] for i in range(rng.randint(5, 16))]
        return f"The months from {items[0]}: " + ", ".join(items) + "."
    start = rng.randint(1, 400)
    step = rng.choice([1, 2, 5, 10])
    items = [str(start + i * step) for i in range(rng.randint(6, 20))]
    return f"Counting by {step} from {start}: " + ", ".join(items) + "."


def _facts(rng: random.Random, w: _World) -> str:
    lines = []
    for _ in range(rng.randint(6, 16)):
        kind = rng.randrange(4)
        if kind == 0:
            a, b = rng.randint(0, 99), rng.randint(0, 99)
            lines.append(f"{a} plus {b} is {a + b}.")
        elif kind == 1:
            a, b = rng.randint(0, 12), rng.randint(0, 12)
            lines.append(f"{a} times {b} is {a * b}.")
        elif kind == 2:
            obj = rng.choice(_OBJECTS)
            lines.append(f"The {obj} is {w.object_color[obj]}.")
        else:
            animal = rng.choice(_ANIMALS)
            lines.append(f"The {animal} eats {w.animal_food[animal]}.")
    return "\n".join(lines)


def generate_documents(num_documents: int, seed: int = SEED) -> Iterator[str]:
    """The demo corpus: ``num_documents`` documents, a pure function of ``seed``."""
    rng = random.Random(seed)
    world = _World(random.Random(SEED))  # the same facts in every split
    makers = [_story] * 3 + [_sequence, _facts]
    for _ in range(num_documents):
        yield rng.choice(makers)(rng, world)


# ---- building the cache ------------------------------------------------------------------------
def _write_jsonl(path: str, docs) -> int:
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps({"text": doc}) + "\n")
            n += 1
    return n


def _train_tokenizer(docs: List[str], model_prefix: str) -> None:
    import sentencepiece as spm

    def sentences():
        for doc in docs:
            for line in doc.split("\n"):
                yield line

    spm.SentencePieceTrainer.train(
        sentence_iterator=sentences(), model_prefix=model_prefix, model_type="bpe",
        vocab_size=VOCAB_SIZE, character_coverage=1.0, byte_fallback=True,
        split_digits=True, num_threads=2, minloglevel=2,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1)


def _build(root: str) -> DemoData:
    from megatron_jai.data.preprocess import preprocess

    train_docs = list(generate_documents(TRAIN_DOCUMENTS, SEED))
    valid_docs = list(generate_documents(VALID_DOCUMENTS, SEED + 1))
    _write_jsonl(os.path.join(root, "train.jsonl"), train_docs)
    _write_jsonl(os.path.join(root, "valid.jsonl"), valid_docs)
    _train_tokenizer(train_docs, os.path.join(root, "tokenizer"))
    tok_path = os.path.join(root, "tokenizer.model")
    quiet = lambda msg: None  # noqa: E731 (our own corpus has no bad lines)
    train = preprocess([os.path.join(root, "train.jsonl")], os.path.join(root, "train"),
                       tok_path, progress=False, log=quiet)
    valid = preprocess([os.path.join(root, "valid.jsonl")], os.path.join(root, "valid"),
                       tok_path, progress=False, log=quiet)
    return DemoData(root=root, tokenizer_path=tok_path, data_prefix=os.path.join(root, "train"),
                    valid_prefix=os.path.join(root, "valid"), vocab_size=train.vocab_size,
                    eod=train.eod, train_documents=train.documents, train_tokens=train.tokens,
                    valid_documents=valid.documents, valid_tokens=valid.tokens)


def _load(root: str) -> Optional[DemoData]:
    manifest = os.path.join(root, "demo.json")
    if not os.path.isfile(manifest):
        return None
    with open(manifest) as f:
        fields = json.load(f)
    fields["root"] = root
    for key in ("tokenizer_path", "data_prefix", "valid_prefix"):
        fields[key] = os.path.join(root, fields[key])
    data = DemoData(**fields)
    needed = [data.tokenizer_path] + [data.data_prefix + e for e in (".bin", ".idx")] + \
             [data.valid_prefix + e for e in (".bin", ".idx")]
    return data if all(os.path.isfile(p) for p in needed) else None


def ensure_demo_data(cache_dir: Optional[str] = None, log=print) -> DemoData:
    """Return the demo corpus, tokenizer and datasets, building them once (see module docstring).

    Args:
        cache_dir: parent directory (default :func:`megatron_jai.data.files.default_cache_dir`).
        log: callable for one progress line when building (None: silent).
    """
    cache_dir = os.path.abspath(cache_dir or default_cache_dir())
    root = os.path.join(cache_dir, f"demo-v{VERSION}")
    data = _load(root)
    if data is not None:
        return data
    os.makedirs(cache_dir, exist_ok=True)
    with file_lock(os.path.join(cache_dir, f".demo-v{VERSION}.lock")):
        data = _load(root)  # built by another process while we waited
        if data is not None:
            return data
        start = time.time()
        tmp = f"{root}.tmp{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        try:
            built = _build(tmp)
            fields = asdict(built)
            fields.pop("root")
            for key in ("tokenizer_path", "data_prefix", "valid_prefix"):
                fields[key] = os.path.relpath(fields[key], tmp)
            with open(os.path.join(tmp, "demo.json"), "w") as f:
                json.dump(fields, f, indent=2)
            shutil.rmtree(root, ignore_errors=True)  # an incomplete earlier attempt
            os.replace(tmp, root)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        data = _load(root)
        if log:
            log(f"demo data: {data.train_documents:,} documents, {data.train_tokens:,} tokens, "
                f"vocab {data.vocab_size}, built in {time.time() - start:.1f} s -> {root}")
        return data
