"""One interface over the two kinds of model a user has: our Megatron-Core checkpoints (loaded at
any TP/PP/EP, under torchrun) and Hugging Face directories (``transformers``, any causal LM,
``trust_remote_code``, local files only).

``load_language_model(path, ...)`` returns a :class:`LanguageModel` with

* ``tokenizer`` (:mod:`megatron_jai.data.tokenizer`; the same encoder on both kinds, so scores
  compare), ``vocab_size`` (rows that carry meaning: probabilities are over these),
  ``context_length``;
* ``log_probs(ids [b, s], vocab=None) -> [b, s-1]``: natural-log probability of every next token
  (every rank gets the result), over the first ``vocab`` ids when given (a vocabulary-extended
  model scored as its base: the base ids keep the base model's logits);
* ``generate(prompt_ids, params, stop, use_cache)`` -> :class:`~megatron_jai.inference.generation.Generation`;
* ``is_main``: the rank that prints and writes; ``close()``.
"""
from __future__ import annotations

import json
import os
from typing import Optional, Sequence

import torch

from megatron_jai.cli import UserError
from megatron_jai.inference.generation import (
    Generation,
    SamplingParams,
    StopCondition,
    hf_generate,
    megatron_generate,
)

from megatron_jai.checkpoint.formats import ConversionError
from megatron_jai.checkpoint.stream import CheckpointFormatError
from megatron_jai.data.tokenizer import TokenizerError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Package errors that are the user's to fix (tools pass them to megatron_jai.cli.run).
USER_ERRORS = (ConversionError, CheckpointFormatError, TokenizerError)


def default_dtype() -> str:
    return "bf16" if torch.cuda.is_available() else "fp32"


def model_kind(path: str) -> str:
    """``"megatron"`` for our checkpoints (root or ``iter_*``), ``"hf"`` for Hugging Face dirs."""
    from megatron_jai.checkpoint.dist import CONFIG_FILE, TRACKER_FILE

    if not os.path.isdir(path):
        raise UserError(f"model {path} does not exist")
    if any(os.path.isfile(os.path.join(path, f)) for f in (CONFIG_FILE, TRACKER_FILE, ".metadata")):
        return "megatron"
    if os.path.isfile(os.path.join(path, "config.json")):
        return "hf"
    raise UserError(f"{path} is neither a Megatron checkpoint (model_config.json) nor a Hugging "
                    f"Face directory (config.json)")


def resolve_tokenizer(model_path: str, kind: str, tokenizer: Optional[str] = None) -> str:
    """``--tokenizer`` when given, else the one the model carries: ``<checkpoint>/tokenizer/`` or
    the Hugging Face directory itself."""
    if tokenizer:
        return tokenizer
    if kind == "megatron":
        from megatron_jai.checkpoint.dist import TOKENIZER_SUBDIR
        from megatron_jai.checkpoint.stream import CheckpointReader

        candidate = os.path.join(CheckpointReader(model_path).root, TOKENIZER_SUBDIR)
    else:
        candidate = model_path
    names = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
    if os.path.isdir(candidate) and any(os.path.isfile(os.path.join(candidate, n)) for n in names):
        return candidate
    raise UserError(f"{model_path} carries no tokenizer (looked for {', '.join(names)} in "
                    f"{candidate}); pass --tokenizer")


def _load_tokenizer(path: str, vocab_size: int):
    from megatron_jai.data.tokenizer import load_tokenizer

    tok = load_tokenizer(path)
    if tok.vocab_size > vocab_size:
        raise UserError(f"tokenizer {path} has {tok.vocab_size} ids but the model only "
                        f"{vocab_size} rows: wrong tokenizer?")
    return tok


class LanguageModel:
    backend: str
    path: str
    tokenizer = None
    vocab_size: int
    context_length: int
    is_main: bool = True

    def log_probs(self, ids: torch.Tensor, vocab: Optional[int] = None) -> torch.Tensor:
        raise NotImplementedError

    def generate(self, prompt_ids: Sequence[int], params: SamplingParams, stop: StopCondition,
                 use_cache: bool = True, on_token=None) -> Generation:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def describe(self) -> dict:
        return {"model": os.path.abspath(self.path), "backend": self.backend,
                "tokenizer": os.path.abspath(self.tokenizer.path), "vocab_size": self.vocab_size,
                "context_length": self.context_length}


class MegatronLM(LanguageModel):
    """Our checkpoint on Megatron-Core; collective over the ranks of a torchrun job."""

    backend = "megatron"

    def __init__(self, path: str, tokenizer: Optional[str] = None, tp: int = 1, pp: int = 1,
                 ep: int = 1, dtype: str = "fp32", seed: int = 1234,
                 first_stage_layers: Optional[int] = None, last_stage_layers: Optional[int] = None):
        import torch.distributed as dist

        self.path = path
        split = dict(first_stage_layers=first_stage_layers, last_stage_layers=last_stage_layers)
        reader, self.layout = check_megatron_layout(path, tp, pp, ep, **split)
        self.cfg = reader.config
        self.vocab_size = self.cfg.vocab_size
        self.context_length = self.cfg.max_position_embeddings
        self.tokenizer = _load_tokenizer(resolve_tokenizer(path, "megatron", tokenizer), self.vocab_size)
        self._owns_process_group = not dist.is_initialized()
        self.model = megatron_model(self.cfg, tp, pp, ep, DTYPES[dtype], reader, seed, **split)
        self.is_main = dist.get_rank() == 0
        self.iteration = reader.iteration

    def log_probs(self, ids: torch.Tensor, vocab: Optional[int] = None) -> torch.Tensor:
        from megatron.core import parallel_state
        from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

        from megatron_jai.inference.forward import (
            broadcast_from_result_rank,
            forward_logits,
            result_rank,
        )

        device = next(self.model.parameters()).device
        ids = ids.to(device)
        targets = ids[:, 1:]
        logits = forward_logits(self.model, ids[:, :-1], gather=False)
        result = None
        if logits is not None:  # (the model masks its vocabulary padding)
            logits = logits.float()
            if vocab is not None:  # scored over the first `vocab` ids only
                shard = logits.shape[-1]
                first = parallel_state.get_tensor_model_parallel_rank() * shard
                outside = torch.arange(first, first + shard, device=device) >= vocab
                logits = logits.masked_fill(outside, float("-inf"))
            with torch.no_grad():
                result = -vocab_parallel_cross_entropy(logits, targets)
        return broadcast_from_result_rank(result, result_rank(), tuple(targets.shape),
                                          torch.float32).cpu()

    def expert_load(self) -> Optional[list]:
        """Share of the routed token slots each expert took, per layer (``[layers][experts]``),
        over the forward passes since the last call; None for a dense model. Collective."""
        if not self.cfg.is_moe:
            return None
        from megatron_jai.moe.layer import expert_load, global_router_table

        device = next(self.model.parameters()).device
        return expert_load(global_router_table(self.model, self.cfg.num_layers,
                                               self.cfg.num_experts, device).cpu())

    def generate(self, prompt_ids, params, stop, use_cache=True, on_token=None) -> Generation:
        return megatron_generate(self.model, self.tokenizer, self.vocab_size, prompt_ids, params,
                                 stop, self.context_length, use_cache=use_cache, on_token=on_token)

    def describe(self) -> dict:
        return {**super().describe(), "iteration": self.iteration, "layout": self.layout}

    def close(self) -> None:
        from megatron_jai import parallel

        if self._owns_process_group:
            parallel.destroy()


def megatron_model(cfg, tp: int = 1, pp: int = 1, ep: int = 1, dtype: torch.dtype = torch.float32,
                   reader=None, seed: int = 1234, first_stage_layers: Optional[int] = None,
                   last_stage_layers: Optional[int] = None):
    """This rank's part of the model in eval mode (DUS skips blend with ``alpha_infer``), with
    the weights of ``reader``'s checkpoint (a ``CheckpointReader``) or random ones; an uneven
    pipeline split with ``first/last_stage_layers``. Inference is dropless: an expert capacity
    factor of training would drop tokens of a one-token decode step (and the HF export has none).
    Initialises the process groups for the layout (a process group that exists is kept)."""
    from megatron_jai import parallel
    from megatron_jai.checkpoint.dist import load_checkpoint
    from megatron_jai.model import build_model

    parallel.initialize(tp=tp, pp=pp, ep=ep, seed=seed)
    model = build_model(cfg.replace(moe_capacity_factor=None), tp=tp, pp=pp, ep=ep,
                        params_dtype=dtype, first_stage_layers=first_stage_layers,
                        last_stage_layers=last_stage_layers)
    if reader is not None:
        load_checkpoint(reader.root, [model], iteration=reader.iteration)
    return model.eval()


def check_megatron_layout(path: str, tp: int, pp: int, ep: int,
                          first_stage_layers: Optional[int] = None,
                          last_stage_layers: Optional[int] = None):
    """The checkpoint reader, and ``TP=.. PP=.. EP=..`` after checking that this checkpoint and
    this torchrun job fit the layout (one clear line, before any rank builds anything)."""
    from megatron_jai.checkpoint.convert import validate_layout
    from megatron_jai.checkpoint.stream import CheckpointReader

    reader = CheckpointReader(path)
    validate_layout(reader.config, tp, pp, ep, first_stage_layers, last_stage_layers)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world % (tp * pp):
        raise UserError(f"{world} processes are not a multiple of TP*PP = {tp * pp}")
    if (world // pp) % ep:
        raise UserError(f"EP={ep} must divide the {world // pp} processes of a pipeline stage")
    return reader, f"TP={tp} PP={pp} EP={ep}"


class HuggingFaceLM(LanguageModel):
    """A Hugging Face directory through ``transformers`` (one process)."""

    backend = "huggingface"

    def __init__(self, path: str, tokenizer: Optional[str] = None, dtype: str = "fp32",
                 device: Optional[str] = None):
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        self.path = path
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise UserError("Hugging Face directories are evaluated in one process (run without "
                            "torchrun, or export nothing and pass the Megatron checkpoint)")
        with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
            config = json.load(f)
        self.vocab_size = int(config.get("vocab_size") or 0)
        self.context_length = int(config.get("max_position_embeddings")
                                  or config.get("n_positions") or 0)
        if not self.vocab_size or not self.context_length:
            raise UserError(f"{path}/config.json has no vocab_size / max_position_embeddings")
        self.tokenizer = _load_tokenizer(resolve_tokenizer(path, "hf", tokenizer), self.vocab_size)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        try:
            self.model = AutoModelForCausalLM.from_pretrained(
                path, trust_remote_code=True, local_files_only=True, dtype=DTYPES[dtype])
        except (OSError, ValueError) as err:
            raise UserError(f"transformers cannot load {path}: {str(err).splitlines()[0]}") from None
        self.model.to(device).eval()

    def log_probs(self, ids: torch.Tensor, vocab: Optional[int] = None) -> torch.Tensor:
        device = next(self.model.parameters()).device
        rows = []
        with torch.no_grad():
            for row in ids.to(device):  # one sequence at a time bounds the fp32 logits
                logits = self.model(input_ids=row[None, :-1]).logits[0, :, : vocab or self.vocab_size]
                logits = logits.float()
                rows.append(torch.log_softmax(logits, -1).gather(-1, row[1:, None])[:, 0])
        return torch.stack(rows).cpu()

    def generate(self, prompt_ids, params, stop, use_cache=True, on_token=None) -> Generation:
        return hf_generate(self.model, self.tokenizer, prompt_ids, params, stop, self.context_length,
                           use_cache=use_cache, on_token=on_token)


def load_language_model(path: str, tokenizer: Optional[str] = None, tp: int = 1, pp: int = 1,
                        ep: int = 1, dtype: Optional[str] = None,
                        first_stage_layers: Optional[int] = None,
                        last_stage_layers: Optional[int] = None) -> LanguageModel:
    """A Megatron checkpoint or a Hugging Face directory (see the module docstring)."""
    dtype = dtype or default_dtype()
    if model_kind(path) == "megatron":
        return MegatronLM(path, tokenizer, tp=tp, pp=pp, ep=ep, dtype=dtype,
                          first_stage_layers=first_stage_layers, last_stage_layers=last_stage_layers)
    if (tp, pp, ep) != (1, 1, 1) or first_stage_layers or last_stage_layers:
        raise UserError("--tp/--pp/--ep and stage layers apply to Megatron checkpoints; a Hugging "
                        "Face directory runs in one process")
    return HuggingFaceLM(path, tokenizer, dtype=dtype)
