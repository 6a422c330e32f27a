"""One process: the SFT loss against a hand-computed masked mean (and blind to prompt labels),
and DPO's precomputed reference log-probs against a live reference model.

    python tests/dist/posttrain_check.py INIT_CKPT SFT_PREFIX DPO_PREFIX TOKENIZER WORKDIR
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def trainer_for(mode, argv):
    import posttrain_jai
    from megatron_jai.training.arguments import parse_args
    from megatron_jai.training.loop import Trainer

    args = parse_args(argv, posttrain_jai.mode_parser(mode))
    trainer = Trainer(args, posttrain_jai.objective_for(mode)(args))
    trainer.setup()
    return trainer


def schedule_loss(trainer, run, batches, scale):
    from megatron_jai.training.objectives import sums_by_name

    losses = trainer.run_schedule(trainer.ddp_model, batches, run, scale, forward_only=True)
    stats, _ = trainer.reduce_stats(losses, len(run.stat_names))
    return trainer.objective.summarize(sums_by_name(stats, run.stat_names), run.labels)["loss"]


def check_sft(init, prefix, tokenizer, work):
    common = ["--init-from", init, "--data-path", prefix, "--tokenizer", tokenizer,
              "--seq-length", "128", "--global-batch-size", "4", "--micro-batch-size", "2",
              "--train-iters", "1", "--data-cache-dir", os.path.join(work, "cache")]
    trainer = trainer_for("sft", common)
    run = trainer.enter_phase(0)
    batches, scale = trainer.global_batch(run.data_iter, run.num_micro)
    loss = schedule_loss(trainer, run, batches, scale)
    # By hand: log-softmax of the logits, the label's log-prob, mean over the masked tokens of
    # both micro-batches together.
    total, count = 0.0, 0.0
    with torch.no_grad():
        for b in batches:
            logits = trainer.model(b["tokens"], b["position_ids"], None).float()  # [b, s, V]
            logp = torch.log_softmax(logits, dim=-1)  # (the model masks its vocabulary padding)
            token_logp = logp.gather(-1, b["labels"].unsqueeze(-1)).squeeze(-1)
            total += float(-(token_logp * b["loss_mask"]).sum())
            count += float(b["loss_mask"].sum())
    assert 0 < count < sum(b["loss_mask"].numel() for b in batches), count  # prompts masked
    assert abs(loss - total / count) < 1e-5, (loss, total / count)
    # A prompt token's label changes: nothing changes.
    changed = []
    for b in batches:
        c = dict(b)
        c["labels"] = torch.where(b["loss_mask"] > 0, b["labels"], (b["labels"] + 7) % 1000)
        assert not torch.equal(c["labels"], b["labels"])
        changed.append(c)
    assert schedule_loss(trainer, run, changed, scale) == loss
    print(f"OK sft masked mean {loss:.6f}", flush=True)


def check_dpo(init, prefix, tokenizer, work):
    from megatron_jai.training.objectives.dpo_reference import (build_reference_model,
                                                                reference_forward)

    common = ["--init-from", init, "--data-path", prefix, "--tokenizer", tokenizer,
              "--seq-length", "128", "--global-batch-size", "4", "--micro-batch-size", "2",
              "--train-iters", "1", "--data-cache-dir", os.path.join(work, "cache")]
    trainer = trainer_for("dpo", common)  # precomputed: computes (or reuses) the file
    run = trainer.enter_phase(0)
    batches, scale = trainer.global_batch(run.data_iter, run.num_micro)
    live = build_reference_model(trainer, init)
    for batch, (logps, lengths) in zip(batches, reference_forward(trainer, live, batches, run)):
        assert torch.allclose(batch["ref_logps"], logps, rtol=0, atol=1e-6), \
            (batch["ref_logps"], logps)
        assert torch.equal(batch["ref_lengths"], lengths)
    # Policy = reference: log 2 exactly, no reward.
    loss = schedule_loss(trainer, run, batches, scale)
    assert abs(loss - 0.6931471805599453) < 1e-6, loss
    print(f"OK dpo precomputed == live, loss {loss:.7f}", flush=True)


if __name__ == "__main__":
    init, sft, dpo, tok, work = sys.argv[1:6]
    from megatron_jai.cli import quiet_warnings

    quiet_warnings()
    check_sft(init, sft, tok, work)
    check_dpo(init, dpo, tok, work)
