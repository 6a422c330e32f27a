"""The optimizer of the one loop: Megatron-Core's Adam (``get_megatron_optimizer``; the distributed
optimizer on GPU, the plain one on CPU) and its step, split so that a non-finite loss or gradient
skips the update."""
from __future__ import annotations

import torch


def build_optimizer(args, ddp_model, dtype: torch.dtype):
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from megatron_jai.training.schedule import DEFAULT_MIN_LR_FRACTION

    # (Each phase's scheduler sets the rates it uses: these are only Megatron-Core's start values.)
    min_lr = args.min_lr if args.min_lr is not None else args.lr * DEFAULT_MIN_LR_FRACTION
    config = OptimizerConfig(
        optimizer="adam", lr=args.lr, min_lr=min_lr, weight_decay=args.weight_decay,
        adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2, adam_eps=args.adam_eps,
        clip_grad=args.clip_grad, bf16=args.bf16, params_dtype=dtype,
        use_distributed_optimizer=args.use_distributed_optimizer)
    return get_megatron_optimizer(config, [ddp_model])


def optimizer_step(optimizer, clip_grad: float, loss_finite: bool) -> tuple:
    """``(updated, grad_norm)``: Megatron's optimizer step, skipped for a non-finite loss or
    gradient."""
    import math

    found_inf = optimizer.prepare_grads()
    grad_norm = float(optimizer.get_grad_norm())
    if found_inf or not loss_finite or not math.isfinite(grad_norm):
        return False, grad_norm
    if clip_grad > 0 and grad_norm > clip_grad:
        # (Megatron-Core's clip_grad_by_total_norm_fp32 asserts CUDA tensors: scale directly.)
        # (MoE models get a ChainedOptimizer: dense and expert parameters; it has no
        # get_parameters() of its own when it chains several.)
        optimizers = getattr(optimizer, "chained_optimizers", [optimizer])
        grads = [p.grad for o in optimizers for p in o.get_parameters() if p.grad is not None]
        torch._foreach_mul_(grads, clip_grad / (grad_norm + 1e-6))
    optimizer.step_with_ready_grads()
    return True, grad_norm
