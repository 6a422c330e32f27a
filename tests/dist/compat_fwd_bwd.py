"""torchrun helper: tiny GPTModel, one forward+backward through Megatron-Core's schedules."""
import sys

import torch

from megatron_jai import parallel
from megatron_jai.presets import TINY
from megatron_jai.model import build_model


def main(tp: int, pp: int) -> None:
    parallel.initialize(tp, pp)
    from megatron.core.pipeline_parallel import get_forward_backward_func

    model = build_model(TINY, tp=tp, pp=pp)
    batch, seq = 2, 16
    tokens = torch.randint(0, TINY.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(seq).expand(batch, seq)

    def forward_step(data_iterator, model):
        loss = model(tokens, positions, None, labels=tokens)  # [b, s] per-token losses

        def loss_func(out):
            mean = out.float().mean()
            # clone: the schedule divides the returned loss in place by num_microbatches
            return mean, {"loss": mean.detach().clone()}

        return loss, loss_func

    losses = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=None, model=[model], num_microbatches=2,
        seq_length=seq, micro_batch_size=batch, forward_only=False)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads), "missing or non-finite gradients"
    for entry in losses:
        assert torch.isfinite(entry["loss"]) and abs(entry["loss"].item() - 6.93) < 0.5  # ~ln(1024)
    print(f"OK rank={torch.distributed.get_rank()} losses={[float(e['loss']) for e in losses]}")
    parallel.destroy()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]))
