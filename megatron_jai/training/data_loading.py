"""Reading a phase's samples in a fixed global order (exact resume), and checking data against the
model before a run starts."""
from __future__ import annotations

import os
from typing import Callable, Optional

import torch

from megatron_jai.training.faults import TrainingError
from megatron_jai.training.phases import Phase


class MicroBatchSampler:
    """Sample indices of this DP rank's micro-batches, in a global order fixed by the dataset.

    Step ``k`` of a phase uses samples ``[k*G, (k+1)*G)`` (``G`` = global batch); micro-batch ``m``
    of DP rank ``r`` takes ``mbs`` of them at ``k*G + m*mbs*dp + r*mbs``. Starting at
    ``consumed`` resumes exactly; a different DP size reads the same samples per step.
    """

    def __init__(self, total: int, consumed: int, micro_batch_size: int, dp_rank: int,
                 dp_size: int):
        self.total, self.consumed = total, consumed
        self.mbs, self.dp_rank, self.dp_size = micro_batch_size, dp_rank, dp_size

    def __len__(self):
        return max(0, (self.total - self.consumed) // (self.mbs * self.dp_size))

    def __iter__(self):
        stride = self.mbs * self.dp_size
        for start in range(self.consumed, self.total - stride + 1, stride):
            first = start + self.dp_rank * self.mbs
            yield list(range(first, first + self.mbs))


def _init_worker(worker_id: int) -> None:
    import signal

    from megatron_jai.training.children import die_with_parent

    # Slurm signals every process of the job step: loader workers must outlive the main process's
    # pre-emption checkpoint instead of dying and failing the next fetch; so SIGTERM cannot end
    # them, and the death of their rank (SIGKILL included) must.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    die_with_parent()


def data_iterator(dataset, consumed: int, total: int, mbs: int, dp_rank: int, dp_size: int,
                  num_workers: int, collate_fn: Callable, seed: int = 0):
    """This DP rank's micro-batches from sample ``consumed`` on. ``seed``: of the loader's own
    generator (making the iterator draws from it, not from torch's global one: exact resume)."""
    from megatron_jai.training.rng import loader_generator

    sampler = MicroBatchSampler(total, consumed, mbs, dp_rank, dp_size)
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, collate_fn=collate_fn, num_workers=num_workers,
        pin_memory=torch.cuda.is_available(), generator=loader_generator(seed),
        worker_init_fn=_init_worker if num_workers else None)
    return iter(loader)


def check_vocabulary(cfg, phases: list[Phase], tokenizer_path: Optional[str]) -> None:
    """Refuse a tokenizer or dataset whose token ids do not fit the model's vocabulary."""
    from megatron_jai.data.datasets import max_token_id
    from megatron_jai.data.preprocess import output_paths, read_meta

    if tokenizer_path:
        from megatron_jai.data.tokenizer import load_tokenizer

        try:
            tok = load_tokenizer(tokenizer_path)
        except ValueError as err:
            raise TrainingError(str(err)) from None
        if tok.vocab_size > cfg.vocab_size:
            raise TrainingError(f"tokenizer {tokenizer_path} has {tok.vocab_size} ids but model "
                                f"{cfg.name!r} only {cfg.vocab_size} embedding rows")
    seen = set()
    for phase in phases:
        for _, prefix in tuple(phase.blend) + tuple(phase.valid_blend):
            if prefix in seen:
                continue
            seen.add(prefix)
            if not os.path.isfile(output_paths(prefix)[0]):
                raise TrainingError(f"dataset {prefix!r}: missing {prefix}.bin/.idx (make it with "
                                    f"tools/preprocess_data.py)")
            meta = read_meta(prefix)
            if meta is not None:
                ids, what = meta["vocab_size"], f"was tokenized with a {meta['vocab_size']}-id " \
                                                f"vocabulary ({meta.get('tokenizer')})"
                top = ids - 1
            else:
                top = max_token_id(prefix)
                what = f"holds token id {top}"
            if top >= cfg.vocab_size:
                raise TrainingError(f"dataset {prefix!r} {what}, but model {cfg.name!r} has only "
                                    f"{cfg.vocab_size} embedding rows (ids 0..{cfg.vocab_size - 1})")


def check_validation(phases: list[Phase], eval_interval: int) -> None:
    """``--eval-interval`` needs validation data of its own in every phase."""
    if not eval_interval:
        return
    missing = [p.name for p in phases if not p.valid_blend]
    if missing:
        raise TrainingError(f"--eval-interval {eval_interval} needs validation data for phase(s) "
                            f"{missing}: give --valid-data-path (or valid_blend: per phase / "
                            f"valid_data: for the jai plan in the config); training data is "
                            f"never split off for it")
