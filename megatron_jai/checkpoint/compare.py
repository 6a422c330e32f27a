"""Logit comparison: the same token ids through ``transformers`` and through our Megatron-Core model.

Run under torchrun (see ``tools/compare_logits.py``). Every rank builds its part of the Megatron model
(:func:`~megatron_jai.model.build_model`, any TP/PP/EP, uneven pipeline splits) and loads the
checkpoint (:func:`~megatron_jai.checkpoint.dist.load_checkpoint`); with PP > 1 the forward pass
goes through Megatron-Core's forward-only pipeline schedule (DUS skip states crossing a stage travel
with the activations). The last pipeline stage gathers the TP vocabulary shards; its first rank runs
the Hugging Face model (fp32, eager attention, ``trust_remote_code`` for JAI exports) on the same ids
and compares the logits of the real (unpadded) vocabulary. Both models are in eval mode: DUS skips
blend with their inference alphas. The HF model routes every token to its experts, so a model
trained with an expert capacity factor is compared dropless on the Megatron side too.
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


def _megatron_logits(model, tokens: torch.Tensor, pp: int):
    """Full-vocabulary logits [b, s, padded V] on the last pipeline stage, None elsewhere."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region

    batch, seq = tokens.shape
    positions = torch.arange(seq, device=tokens.device).expand(batch, seq)
    with torch.no_grad():
        if pp == 1:
            logits = model(tokens, positions, None)
        else:
            def forward_step(data_iterator, chunk):
                output = chunk(tokens, positions, None)

                def keep_logits(out, non_loss_data=False):
                    return out.detach().clone()

                return output, keep_logits

            outputs = get_forward_backward_func()(
                forward_step_func=forward_step, data_iterator=None, model=[model],
                num_microbatches=1, seq_length=seq, micro_batch_size=batch, forward_only=True,
                collect_non_loss_data=True)
            logits = outputs[0] if parallel_state.is_pipeline_last_stage() else None
        if logits is None:
            return None
        return gather_from_tensor_model_parallel_region(logits.contiguous())


def compare_logits(hf_dir: str, mcore_dir: str, tp: int = 1, pp: int = 1, seq_len: int = 32,
                   batch: int = 2, seed: int = 0, hf_device: str | None = None,
                   ep: int = 1, first_stage_layers: int | None = None,
                   last_stage_layers: int | None = None) -> LogitComparison:
    """Collective over all ranks; every rank returns the same comparison. ``hf_device`` places the
    reference model (default: the Megatron model's device; "cpu" when the GPU cannot hold both);
    ``first_stage_layers`` / ``last_stage_layers`` give an uneven pipeline split."""
    from megatron.core import parallel_state

    from megatron_jai import parallel
    from megatron_jai.checkpoint.dist import load_checkpoint
    from megatron_jai.checkpoint.stream import CheckpointReader
    from megatron_jai.model import build_model

    reader = CheckpointReader(mcore_dir)  # a checkpoint root or one of its iter_* directories
    cfg = reader.config.replace(moe_capacity_factor=None)
    parallel.initialize(tp=tp, pp=pp, ep=ep, seed=seed)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    model = build_model(cfg, tp=tp, pp=pp, ep=ep, params_dtype=torch.float32,
                        first_stage_layers=first_stage_layers, last_stage_layers=last_stage_layers)
    load_checkpoint(reader.root, [model], iteration=reader.iteration)
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq_len), generator=gen).to(device)

    logits = _megatron_logits(model, tokens, pp)
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
