"""Logit comparison: the same token ids through ``transformers`` and through our Megatron-Core model.

Run under torchrun (see ``tools/compare_logits.py``). Every rank builds its part of the Megatron model
(:func:`~megatron_jai.model.build_model`, any TP/PP/EP, uneven pipeline splits) and loads the
checkpoint (:func:`~megatron_jai.checkpoint.dist.load_checkpoint`) through
:func:`~megatron_jai.inference.lm.megatron_model`; the forward pass is
:func:`~megatron_jai.inference.forward.forward_logits` (Megatron-Core's forward-only pipeline schedule
when PP > 1; DUS skip states crossing a stage travel with the activations). The last pipeline stage
gathers the TP vocabulary shards; its first rank runs the Hugging Face model (fp32, eager attention, ``trust_remote_code`` for JAI exports) on the same ids
and compares the logits of the real (unpadded) vocabulary. Both models are in eval mode: DUS skips
blend with their inference alphas. The HF model routes every token to its experts; inference on
the Megatron side is dropless too (``megatron_model``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class LogitComparison:
    max_abs_diff: float
    max_abs_logit: float
    argmax_agreement: float  # fraction of positions where both models pick the same next token
    shape: tuple


def compare_logits(hf_dir: str, mcore_dir: str, tp: int = 1, pp: int = 1, seq_len: int = 32,
                   batch: int = 2, seed: int = 0, hf_device: str | None = None,
                   ep: int = 1, first_stage_layers: int | None = None,
                   last_stage_layers: int | None = None) -> LogitComparison:
    """Collective over all ranks; every rank returns the same comparison. ``hf_device`` places the
    reference model (default: the Megatron model's device; "cpu" when the GPU cannot hold both);
    ``first_stage_layers`` / ``last_stage_layers`` give an uneven pipeline split."""
    from megatron.core import parallel_state

    from megatron_jai.checkpoint.stream import CheckpointReader
    from megatron_jai.inference.forward import forward_logits
    from megatron_jai.inference.lm import megatron_model

    reader = CheckpointReader(mcore_dir)  # a checkpoint root or one of its iter_* directories
    cfg = reader.config
    model = megatron_model(cfg, tp, pp, ep, torch.float32, reader, seed,
                           first_stage_layers=first_stage_layers, last_stage_layers=last_stage_layers)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq_len), generator=gen).to(device)

    logits = forward_logits(model, tokens)
    result = torch.zeros(3, dtype=torch.float64, device=device)
    compares = (parallel_state.is_pipeline_last_stage()
                and parallel_state.get_tensor_model_parallel_rank() == 0
                and parallel_state.get_data_parallel_rank() == 0)
    if compares:
        from transformers import AutoModelForCausalLM

        hf_model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32,
                                                        attn_implementation="eager",
                                                        trust_remote_code=True)
        hf_model = hf_model.to(hf_device or device).eval()
        with torch.no_grad():
            ref = hf_model(input_ids=tokens.to(hf_model.device)).logits.float().to(device)
        del hf_model
        mine = logits[..., : cfg.vocab_size].float()
        if mine.shape != ref.shape:
            raise ValueError(f"logit shapes differ: Megatron {tuple(mine.shape)}, HF {tuple(ref.shape)}")
        result[0] = (mine - ref).abs().max()
        result[1] = ref.abs().max()
        result[2] = (mine.argmax(-1) == ref.argmax(-1)).double().mean()
    # Exactly one rank compared; the others hold zeros, so the sum is its result.
    dist.all_reduce(result)
    return LogitComparison(result[0].item(), result[1].item(), result[2].item(),
                           (batch, seq_len, cfg.vocab_size))
