"""Forward-only passes of our Megatron-Core model at any TP/PP/EP, for generation, scoring and checks.

One function, :func:`forward_logits`: with PP = 1 the model is called directly; with PP > 1 the call
goes through Megatron-Core's forward-only pipeline schedule (which also carries the DUS skip states
between stages, see :mod:`megatron_jai.model.dus_block`). An ``inference_context`` (Megatron-Core's
``StaticInferenceContext``) turns on its KV cache; the context's sequence offset is advanced here.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist


def forward_logits(model, tokens: torch.Tensor, inference_context=None,
                   gather: bool = True) -> Optional[torch.Tensor]:
    """Logits ``[b, s, padded V]`` (``[b, 1, V]`` with an inference context: Megatron materialises
    only the last position) on the last pipeline stage, ``None`` on the others. ``gather=False``
    keeps them split over the TP ranks along the vocabulary (``[b, s, padded V / tp]``)."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region

    batch, seq = tokens.shape
    start = inference_context.sequence_len_offset if inference_context is not None else 0
    positions = torch.arange(start, start + seq, device=tokens.device).expand(batch, seq)
    kwargs = {}
    if inference_context is not None:
        # Megatron's inference path always gathers the TP logits itself.
        kwargs = dict(inference_context=inference_context, runtime_gather_output=True)
    with torch.no_grad():
        if parallel_state.get_pipeline_model_parallel_world_size() == 1:
            logits = model(tokens, positions, None, **kwargs)
        else:
            def forward_step(data_iterator, chunk):
                output = chunk(tokens, positions, None, **kwargs)
                return output, lambda out, non_loss_data=False: out.detach().clone()

            outputs = get_forward_backward_func()(
                forward_step_func=forward_step, data_iterator=None, model=[model],
                num_microbatches=1, seq_length=seq, micro_batch_size=batch, forward_only=True,
                collect_non_loss_data=True)
            logits = outputs[0] if parallel_state.is_pipeline_last_stage() else None
    if inference_context is not None:
        inference_context.increment_sequence_len_offset(seq)
        return logits
    if logits is None or not gather:
        return logits
    return gather_from_tensor_model_parallel_region(logits.contiguous())


def result_rank() -> int:
    """The global rank that holds the results (last pipeline stage, first TP / data-parallel rank):
    it samples the tokens and reports the scores; :func:`broadcast_from_result_rank` shares them."""
    from megatron.core import parallel_state

    mine = (parallel_state.is_pipeline_last_stage()
            and parallel_state.get_tensor_model_parallel_rank() == 0
            and parallel_state.get_data_parallel_rank() == 0)
    if not dist.is_initialized():
        return 0
    device = _comm_device()
    rank = torch.tensor([dist.get_rank() if mine else -1], device=device)
    dist.all_reduce(rank, op=dist.ReduceOp.MAX)
    return int(rank.item())


def broadcast_from_result_rank(tensor: Optional[torch.Tensor], src: int, shape, dtype) -> torch.Tensor:
    """``tensor`` from rank ``src`` on every rank (others pass ``None`` and the expected shape)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return tensor
    device = _comm_device()
    if dist.get_rank() == src:
        buf = tensor.to(device=device, dtype=dtype).contiguous()
    else:
        buf = torch.empty(shape, dtype=dtype, device=device)
    dist.broadcast(buf, src)
    return buf


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
        else torch.device("cpu")
