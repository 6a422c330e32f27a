"""Datasets of the local lm-evaluation-harness tasks, built from files on disk (never a hub).

NTREX-128 (evaluation only: never train or tune on it) is read from ``metadata.ntrex_dir`` when
the run passes it, else from ``$JAI_SHARED_DIR/data/eval``.
"""
import os
import random

CHOICES = 4


def _lines(ntrex_dir, lang):
    path = os.path.join(ntrex_dir, f"ntrex128.{lang}.txt")
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f]


def _ntrex_dir(ntrex_dir=None):
    if ntrex_dir:
        return ntrex_dir
    from megatron_jai.paths import shared_path

    return shared_path("data", "eval")


def multiple_choice_rows(sources, targets, choices=CHOICES):
    """Row i: ``source`` = sources[i]; ``choices`` = targets[i] and ``choices - 1`` other targets
    drawn with ``random.Random(i)``, in an order shuffled by the same generator; ``label`` = where
    targets[i] landed."""
    n = len(targets)
    rows = []
    for i in range(n):
        rng = random.Random(i)
        others = [j + (j >= i) for j in rng.sample(range(n - 1), choices - 1)]  # never i itself
        order = [i] + others
        rng.shuffle(order)
        rows.append({"id": i, "source": sources[i], "choices": [targets[j] for j in order],
                     "label": order.index(i)})
    return rows


def _dataset(src, tgt, ntrex_dir=None, **_):
    import datasets

    d = _ntrex_dir(ntrex_dir)
    sources, targets = _lines(d, src), _lines(d, tgt)
    if len(sources) != len(targets):
        raise ValueError(f"NTREX files in {d} are not line-aligned")
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(multiple_choice_rows(sources, targets))})


def ntrex_th_mc(**kwargs):
    return _dataset("eng", "tha", **kwargs)


def ntrex_en_mc(**kwargs):
    return _dataset("tha", "eng", **kwargs)
