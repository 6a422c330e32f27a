"""Training / validation datasets: Megatron-Core ``GPTDataset`` s blended by
``BlendedMegatronDatasetBuilder``.

A *blend* says which indexed datasets (``.bin/.idx`` prefixes) to draw from and how much:

* ``"path/prefix"``: one dataset;
* ``[(weight, prefix), ...]`` (or ``(prefix, weight)``): relative sampling weights, normalised;
* ``{prefix: ratio, ...}``: target shares of the training tokens; they must sum to 1
  (e.g. ``{"thai": 0.27, "english": 0.73}`` for JAI-1's Thai-injection phase);
* ``[prefix, ...]``: no weights: each dataset contributes in proportion to its size.

Every sample is ``seq_length`` tokens packed across documents, so a dataset's share of samples is its
share of tokens. Items are dicts of tensors: ``tokens`` [s], ``labels`` [s] (tokens shifted by one),
``loss_mask`` [s] (float), ``position_ids`` [s], ``attention_mask`` [1, s, s] only with
``create_attention_mask=True``, and ``dataset_id`` (index into :func:`blend_prefixes`) for blends of
two or more datasets.

Index caches (document/sample/shuffle indices) go to ``cache_dir`` (default
``<cache>/dataset_index``, see :func:`megatron_jai.data.files.default_cache_dir`), never next to the
data. With ``torch.distributed`` initialised, :func:`build_datasets` must be called on every rank:
rank 0 builds missing caches first and the others load them after a barrier (Megatron-Core's
protocol); without it, everything is built in-process.
"""
from __future__ import annotations

import copy
import functools
import logging
import math
import os
import re
from collections import OrderedDict
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy

from megatron_jai.cli import UserError
from megatron_jai.data.files import default_cache_dir
from megatron_jai.data.preprocess import output_paths, read_meta

Blend = Union[str, Sequence, Dict[str, float]]
RATIO_TOLERANCE = 1e-3


class DatasetError(UserError):
    """A blend or dataset that cannot be used (one-line message, meant for the user)."""


class DatasetTokenizer:
    """What ``GPTDataset`` needs from a tokenizer: ``vocab_size``, ``eod`` and ``unique_identifiers``
    (part of the index-cache hash). It deliberately has no ``pad``: Megatron-Core then pads with -1,
    which never collides with a real id (Phi-3 uses ``<|endoftext|>`` as both EOD and pad)."""

    def __init__(self, vocab_size: Optional[int], eod: int):
        self.vocab_size = vocab_size
        self.eod = int(eod)
        self.unique_identifiers = OrderedDict(
            [("class", type(self).__name__), ("vocab_size", vocab_size), ("eod", self.eod)])


def normalize_blend(blend: Blend) -> Tuple[List[str], Optional[List[float]]]:
    """Any accepted blend form (module docstring) -> Megatron-Core's ``(prefixes, weights|None)``.
    Weights are normalised to sum 1; a single dataset gets ``None`` (no blending).

    The one parser and validator of blends: the training phases (``megatron_jai.training.phases``)
    resolve their dataset names and hand their blends here as ``[(weight, prefix), ...]``."""
    if isinstance(blend, (str, os.PathLike)):
        return [os.fspath(blend)], None
    if isinstance(blend, dict):
        prefixes = [os.fspath(p) for p in blend]
        if not prefixes:
            raise DatasetError("empty blend")
        ratios = [_blend_weight(r, p) for p, r in zip(prefixes, blend.values())]
        if abs(sum(ratios) - 1.0) > RATIO_TOLERANCE:
            raise DatasetError(f"blend target ratios must sum to 1, they sum to {sum(ratios):.4f}: "
                               f"{dict(zip(prefixes, ratios))}")
        weights = ratios
    else:
        items = list(blend)
        if not items:
            raise DatasetError("empty blend")
        if all(isinstance(i, (str, os.PathLike)) for i in items):
            prefixes = [os.fspath(i) for i in items]
            if len(set(prefixes)) != len(prefixes):
                raise DatasetError(f"a dataset appears twice in the blend: {prefixes}")
            return prefixes, None
        prefixes, weights = [], []
        for item in items:
            if not (isinstance(item, (tuple, list)) and len(item) == 2 and
                    any(isinstance(x, (str, os.PathLike)) for x in item)):
                raise DatasetError(f"blend entries must be (weight, prefix) pairs, got {item!r}")
            a, b = item
            weight, prefix = (a, b) if isinstance(b, (str, os.PathLike)) else (b, a)
            prefixes.append(os.fspath(prefix))
            weights.append(_blend_weight(weight, prefixes[-1]))
    if len(set(prefixes)) != len(prefixes):
        raise DatasetError(f"a dataset appears twice in the blend: {prefixes}")
    if len(prefixes) == 1:
        return prefixes, None
    total = sum(weights)
    return prefixes, [w / total for w in weights]


def _blend_weight(value, prefix: str) -> float:
    """A blend weight or ratio: a positive, finite number."""
    try:
        weight = float(value)
    except (TypeError, ValueError):
        raise DatasetError(f"blend weight {value!r} of {prefix} is not a number") from None
    if not weight > 0 or not math.isfinite(weight):
        raise DatasetError(f"blend weight for {prefix} must be positive and finite, got {value!r}")
    return weight


def check_prefixes(prefixes: Sequence[str], vocab_size: Optional[int] = None,
                   eod: Optional[int] = None) -> None:
    """Each prefix has its ``.bin`` and ``.idx``; when it has a ``.meta.json`` (written by our
    preprocessing) its tokenizer's vocabulary size and EOD must match the given ones."""
    for prefix in prefixes:
        bin_path, idx_path, _ = output_paths(prefix)
        missing = [p for p in (bin_path, idx_path) if not os.path.isfile(p)]
        if missing:
            raise DatasetError(f"dataset {prefix!r}: missing {', '.join(missing)} "
                               f"(make it with tools/preprocess_data.py)")
        meta = read_meta(prefix)
        if meta is None:
            continue
        if vocab_size is not None and meta.get("vocab_size") != vocab_size:
            raise DatasetError(f"dataset {prefix!r} was tokenized with a {meta.get('vocab_size')}-id "
                               f"vocabulary ({meta.get('tokenizer')}), not {vocab_size}")
        if eod is not None and meta.get("eod") not in (None, eod):
            raise DatasetError(f"dataset {prefix!r} uses end-of-document id {meta.get('eod')}, "
                               f"the tokenizer {eod}")


def max_token_id(prefix: str) -> int:
    """Largest token id in a dataset (one pass over the memory-mapped ``.bin``): a model whose
    vocabulary is not larger than this cannot train on it."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix)
    tokens = numpy.memmap(output_paths(prefix)[0], dtype=ds.index.dtype, mode="r")
    return int(tokens.max()) if tokens.size else -1


def _tokenizer_info(tokenizer, eod, vocab_size, prefixes) -> Tuple[Optional[int], int]:
    if tokenizer is not None:
        if isinstance(tokenizer, (str, os.PathLike)):
            from megatron_jai.data.tokenizer import load_tokenizer

            tokenizer = load_tokenizer(tokenizer)
        return tokenizer.vocab_size, tokenizer.eod
    if eod is not None:
        return vocab_size, eod
    metas = [read_meta(p) for p in prefixes]
    if metas and all(m is not None for m in metas):
        eods = {m["eod"] for m in metas}
        sizes = {m["vocab_size"] for m in metas}
        if len(eods) == 1 and len(sizes) == 1:
            return sizes.pop(), eods.pop()
        raise DatasetError(f"the datasets were made with different tokenizers (vocab sizes "
                           f"{sorted(sizes)}, EOD ids {sorted(eods)})")
    raise DatasetError("pass tokenizer= or eod= (the datasets carry no .meta.json)")


def _split_string(split: str) -> str:
    parts = [float(x) for x in re.findall(r"[.0-9]+", split)]
    if not parts or len(parts) > 3 or sum(parts[:2]) <= 0 or any(p < 0 for p in parts):
        raise DatasetError(f"split must be 'train,valid' weights such as '98,2', got {split!r}")
    if len(parts) == 3 and parts[2] > 0:
        raise DatasetError(f"test splits are not used in training; give 'train,valid', not {split!r}")
    parts = (parts + [0.0, 0.0])[:2]
    return f"{parts[0]},{parts[1]},0"


@functools.lru_cache(maxsize=None)
def _make_builder_class():
    from megatron.core.datasets.blended_dataset import BlendedDataset
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    import torch

    class Builder(BlendedMegatronDatasetBuilder):
        """Megatron-Core's builder, usable without ``torch.distributed``: its ``BlendedDataset``
        asks for the process rank on a cache miss, so without a process group the (cheap) blend
        indices are built in memory instead of cached. ``GPTDataset`` caches work either way."""

        @staticmethod
        def build_generic_dataset(cls, is_built_on_rank, synchronize_ranks, *args):
            if cls is BlendedDataset and not torch.distributed.is_initialized():
                *head, config = args
                config = copy.copy(config)
                config.path_to_cache = None
                args = (*head, config)
            return BlendedMegatronDatasetBuilder.build_generic_dataset(
                cls, is_built_on_rank, synchronize_ranks, *args)

    # Without a process group the blend indices are in memory by design: drop the
    # "Cannot save the BlendedDataset indexes" warning that would follow.
    logging.getLogger("megatron.core.datasets.blended_dataset").addFilter(_NO_CACHE_FILTER)
    return Builder


class _NoCacheWarningFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "because path_to_cache is None" not in record.getMessage()


_NO_CACHE_FILTER = _NoCacheWarningFilter()


def build_datasets(
    blend: Blend,
    seq_length: int,
    num_samples: int,
    seed: int = 1234,
    tokenizer=None,
    eod: Optional[int] = None,
    vocab_size: Optional[int] = None,
    split: Optional[str] = None,
    valid_blend: Optional[Blend] = None,
    valid_num_samples: Optional[int] = None,
    cache_dir: Optional[str] = None,
    is_built_on_rank: Optional[Callable[[], bool]] = None,
    eod_mask_loss: bool = False,
    reset_position_ids: bool = False,
    reset_attention_mask: bool = False,
    create_attention_mask: bool = False,
):
    """Build ``(train_ds, valid_ds)`` for a blend (module docstring).

    Args:
        blend: training blend.
        seq_length: tokens per sample (each item holds ``seq_length`` inputs and labels).
        num_samples: training samples to provide (iterations x global batch); datasets are
            repeated (reshuffled per epoch) when smaller.
        seed: shuffling seed.
        tokenizer: a :class:`~megatron_jai.data.tokenizer.Tokenizer` or a path to one; or give
            ``eod`` (and optionally ``vocab_size``); or neither when every prefix has a
            ``.meta.json``. Checked against the datasets' ``.meta.json``.
        split: ``"train,valid"`` weights splitting each dataset's documents (e.g. ``"98,2"``);
            ignored when ``valid_blend`` is given. Neither: no validation set (``valid_ds`` None).
        valid_blend: validation from separate datasets.
        valid_num_samples: validation samples (default ``max(1, num_samples // 100)``).
        cache_dir: where Megatron-Core caches its indices (default ``<cache>/dataset_index``).
        is_built_on_rank: Megatron-Core's hook: ranks for which it returns False get ``None``
            datasets (e.g. only TP rank 0 of the first/last pipeline stage loads data). Default:
            every rank builds.
        eod_mask_loss, reset_position_ids, reset_attention_mask, create_attention_mask: passed to
            ``GPTDatasetConfig``.
    """
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    if seq_length < 1 or num_samples < 1:
        raise DatasetError(f"seq_length and num_samples must be >= 1 "
                           f"(got {seq_length}, {num_samples})")
    train = normalize_blend(blend)
    valid = normalize_blend(valid_blend) if valid_blend is not None else None
    all_prefixes = train[0] + (valid[0] if valid else [])
    vocab_size, eod = _tokenizer_info(tokenizer, eod, vocab_size, all_prefixes)
    check_prefixes(all_prefixes, vocab_size, eod)
    if valid_num_samples is None:
        valid_num_samples = max(1, num_samples // 100)
    cache_dir = os.path.abspath(cache_dir or os.path.join(default_cache_dir(), "dataset_index"))
    os.makedirs(cache_dir, exist_ok=True)

    common = dict(
        random_seed=seed,
        sequence_length=seq_length,
        path_to_cache=cache_dir,
        tokenizer=DatasetTokenizer(vocab_size, eod),
        reset_position_ids=reset_position_ids,
        reset_attention_mask=reset_attention_mask,
        eod_mask_loss=eod_mask_loss,
        create_attention_mask=create_attention_mask,
        # Our blends are exact (the mid-level datasets are built for the weighted share), but
        # Megatron-Core's greedy blend may overdraw a dataset by a sample or two.
        mid_level_dataset_surplus=0.005,
    )
    if valid is not None:
        config = GPTDatasetConfig(blend_per_split=[train, valid, None], **common)
        sizes = [num_samples, valid_num_samples, None]
    else:
        split_str = _split_string(split) if split else "1,0,0"
        config = GPTDatasetConfig(blend=train, split=split_str, **common)
        has_valid = config.split_matrix[1] is not None
        sizes = [num_samples, valid_num_samples if has_valid else 0, 0]
    builder_cls = _make_builder_class()
    train_ds, valid_ds, _ = builder_cls(
        GPTDataset, sizes, is_built_on_rank or (lambda: True), config).build()
    return train_ds, valid_ds


def blend_prefixes(dataset) -> List[str]:
    """The dataset prefixes of a built dataset, in ``dataset_id`` order."""
    if hasattr(dataset, "datasets"):  # BlendedDataset
        return [d.dataset_path for d in dataset.datasets]
    return [dataset.dataset_path]


def sample_shares(dataset, num_samples: Optional[int] = None) -> Dict[str, float]:
    """Share of each prefix among the first ``num_samples`` samples (all by default), read from
    the blend's index without loading tokens (cheap; usable for per-dataset logging)."""
    prefixes = blend_prefixes(dataset)
    if not hasattr(dataset, "dataset_index"):
        return {prefixes[0]: 1.0}
    n = len(dataset) if num_samples is None else min(num_samples, len(dataset))
    counts = numpy.bincount(numpy.asarray(dataset.dataset_index[:n]), minlength=len(prefixes))
    return {p: float(c) / max(n, 1) for p, c in zip(prefixes, counts)}


def token_shares(dataset, num_samples: Optional[int] = None) -> Dict[str, float]:
    """Share of each prefix among the trained-on tokens (``loss_mask`` 1) of the first
    ``num_samples`` samples, measured by reading the samples themselves."""
    prefixes = blend_prefixes(dataset)
    n = len(dataset) if num_samples is None else min(num_samples, len(dataset))
    counts = numpy.zeros(len(prefixes))
    for i in range(n):
        item = dataset[i]
        counts[int(item.get("dataset_id", 0))] += float(item["loss_mask"].sum())
    total = counts.sum()
    return {p: float(c / total) if total else 0.0 for p, c in zip(prefixes, counts)}
