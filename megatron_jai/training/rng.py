"""The random number generators of a training rank, for exact resume.

Every generator a rank draws from is seeded from ``--seed`` at start-up (Megatron-Core seeds only
torch's and its tensor-parallel tracker; Python's ``random`` and NumPy's would otherwise start
from OS entropy, different in every process) and saved in every checkpoint
(:mod:`~.checkpointing`). Data loading draws from none of them: each DataLoader gets a generator
of its own (:func:`loader_generator`), so creating an iterator on resume (or for a validation
pass) leaves the training streams where an uninterrupted run has them.
"""
from __future__ import annotations

import random

import numpy
import torch


def seed_host_generators(seed: int) -> None:
    """Seed Python's and NumPy's global generators from the run's seed and this rank's place
    (ranks of a model draw differently, as Megatron-LM's seeding does; reruns identically)."""
    from megatron.core import parallel_state as ps

    rank_seed = seed + 100 * ps.get_pipeline_model_parallel_rank() \
        + 10 * ps.get_tensor_model_parallel_rank() + 1000 * ps.get_data_parallel_rank()
    random.seed(rank_seed)
    numpy.random.seed(rank_seed % 2 ** 32)


def loader_generator(seed: int) -> torch.Generator:
    """A DataLoader's own generator (its worker seeds), so that making an iterator does not draw
    from torch's global one."""
    return torch.Generator().manual_seed(seed)
