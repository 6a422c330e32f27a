"""The DPO loss registry against TRL: every entry's loss and gradient equal TRL's own
``DPOTrainer._compute_loss`` (the pinned trl), run on random per-token log-probs; the flags come
from the registry and their values are checked where they are parsed."""
import argparse
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from megatron_jai.training.faults import TrainingError
from megatron_jai.training.objectives import dpo_losses


@pytest.fixture(scope="module")
def single_rank():
    from megatron_jai import parallel

    parallel.initialize(1, 1, seed=3)
    yield
    parallel.destroy()


def random_pairs(pairs: int, seq: int, generator, sorted_logratios: bool = False):
    """Per-token log-probs ``[pairs, 2, seq]`` (leaf, float64) under completion masks of random
    lengths, and reference log-probs ``[pairs, 2]``. ``sorted_logratios``: the pairs ordered so
    that policy and reference log-ratios (chosen - rejected) both ascend."""
    mask = torch.zeros(pairs, 2, seq, dtype=torch.float64)
    for i in range(pairs):
        for j in range(2):
            start = int(torch.randint(1, seq // 2, (1,), generator=generator))
            length = int(torch.randint(1, seq - start + 1, (1,), generator=generator))
            mask[i, j, start:start + length] = 1
    logps = -2 * torch.rand(pairs, 2, seq, dtype=torch.float64, generator=generator)
    ref = -3 * torch.rand(pairs, 2, dtype=torch.float64, generator=generator) * mask.sum(-1)
    if sorted_logratios:
        order = ((logps * mask).sum(-1) @ torch.tensor([1.0, -1.0], dtype=torch.float64)).argsort()
        logps, mask, ref = logps[order], mask[order], ref[order]
        ref[:, 0] = ref[:, 1] + torch.randn(pairs, dtype=torch.float64, generator=generator).sort()[0]
    return logps.requires_grad_(), mask, ref


def ours(name, beta, label_smoothing, nll_weight, logps, mask, ref):
    """Our DPO objective's loss (the mean over pairs) on the pairs, as the loop gets it."""
    from megatron_jai.training.objectives.dpo import DPOObjective

    args = argparse.Namespace(dpo_loss=name, dpo_beta=beta, dpo_label_smoothing=label_smoothing,
                              dpo_nll_weight=nll_weight, reference_mode="precomputed")
    objective = DPOObjective(args)
    pairs, _, seq = logps.shape
    batch = {"tokens": torch.zeros(2 * pairs, seq, dtype=torch.long),
             "loss_mask": mask.reshape(2 * pairs, seq), "ref_logps": ref,
             "ref_lengths": mask.sum(-1)}  # rows 2i chosen, 2i + 1 rejected
    [batch] = objective.prepare_batches(SimpleNamespace(device=torch.device("cpu")), [batch], None)
    loss_sum, _ = objective.loss(-logps.reshape(2 * pairs, seq), batch, ("pairs",))
    return loss_sum / pairs


class _Accelerator:
    device = torch.device("cpu")

    def gather_for_metrics(self, tensor):
        return tensor

    gather = gather_for_metrics


def trl(loss_types, weights, beta, label_smoothing, logps, mask, ref):
    """TRL's DPOTrainer._compute_loss on a stand-in trainer (precomputed reference) whose model
    returns the per-token log-probs of the completion tokens, as TRL's fused LM head does."""
    from trl.trainer.dpo_trainer import DPOTrainer

    pairs, _, seq = logps.shape
    # TRL's batch: chosen rows first, then rejected; its masks cover input ids (one longer than
    # the shifted per-token log-probs).
    per_token = torch.cat([logps[:, 0], logps[:, 1]])
    shifted_mask = torch.cat([mask[:, 0], mask[:, 1]])
    completion_mask = torch.cat([torch.zeros(2 * pairs, 1, dtype=torch.long),
                                 shifted_mask.long()], dim=1)

    def model(**kwargs):
        zeros = torch.zeros_like(per_token)
        return SimpleNamespace(log_probs=per_token * shifted_mask, entropy=zeros,
                               mean_logits=zeros, is_top1=zeros.bool())

    trainer = SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=_Accelerator(), aux_loss_enabled=False,
        ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl",
        loss_types=loss_types, loss_weights=weights, beta=beta, label_smoothing=label_smoothing,
        use_weighting=False, args=SimpleNamespace(discopop_tau=0.05),
        _metrics={"train": defaultdict(list)}, _total_train_tokens=0, _tp_size=1)
    inputs = {"input_ids": torch.zeros_like(completion_mask),
              "attention_mask": torch.ones_like(completion_mask),
              "completion_mask": completion_mask,
              "ref_chosen_logps": ref[:, 0], "ref_rejected_logps": ref[:, 1]}
    return DPOTrainer._compute_loss(trainer, model, inputs, return_outputs=False)


CASES = [(name, 0.0, 0.0) for name in dpo_losses.LOSSES] + [
    ("sigmoid", 0.2, 0.0),  # cDPO
    ("robust", 0.3, 0.0),
    ("sigmoid", 0.0, 0.7),  # RPO: TRL's ["sigmoid", "sft"] with weights [1, 0.7]
    ("ipo", 0.0, 0.4),
]


@pytest.mark.parametrize("name,label_smoothing,nll_weight", CASES)
def test_loss_and_gradient_equal_trl(single_rank, name, label_smoothing, nll_weight):
    generator = torch.Generator().manual_seed(CASES.index((name, label_smoothing, nll_weight)))
    # TRL 1.16 keeps cDPO's formula only in its "aot" loss, which sorts the pairs' log-ratios:
    # on pairs already in that order it is cDPO.
    cdpo = name == "sigmoid" and label_smoothing > 0
    for beta in (0.1, 0.7):
        logps, mask, ref = random_pairs(6, 16, generator, sorted_logratios=cdpo)
        mine = ours(name, beta, label_smoothing, nll_weight, logps, mask, ref)
        types, weights = ["aot" if cdpo else name], [1.0]
        if nll_weight:
            types, weights = types + ["sft"], weights + [nll_weight]
        theirs = trl(types, weights, beta, label_smoothing, logps, mask, ref)
        assert abs(float(mine) - float(theirs)) < 1e-6, (name, beta, float(mine), float(theirs))
        [g_mine] = torch.autograd.grad(mine, logps)
        [g_theirs] = torch.autograd.grad(theirs, logps)
        assert float((g_mine - g_theirs).abs().max()) < 1e-6, (name, beta)
        assert float(g_mine.abs().max()) > 0


def test_flags_come_from_the_registry_and_are_checked(monkeypatch):
    import posttrain_jai

    parser = posttrain_jai.mode_parser("dpo")
    args = parser.parse_args([])
    assert (args.dpo_loss, args.dpo_beta, args.dpo_label_smoothing, args.dpo_nll_weight) == \
        ("sigmoid", 0.1, 0.0, 0.0)
    for flag, value in (("--dpo-beta", "0"), ("--dpo-beta", "nan"),
                        ("--dpo-label-smoothing", "0.5"), ("--dpo-label-smoothing", "-0.1"),
                        ("--dpo-nll-weight", "-1"), ("--dpo-loss", "kto")):
        with pytest.raises(SystemExit) as exit_:
            parser.parse_args([flag, value])
        assert exit_.value.code == 2
    # Values from a config file (no argparse type) are checked when the objective is made.
    from megatron_jai.training.objectives.dpo import DPOObjective

    with pytest.raises(TrainingError, match=r"--dpo-label-smoothing must be in \[0, 0.5\)"):
        DPOObjective(argparse.Namespace(**{**vars(args), "dpo_label_smoothing": 0.5}))
    # A new loss is one entry: a choice of --dpo-loss, computed by the objective.
    monkeypatch.setattr(dpo_losses, "LOSSES", dict(dpo_losses.LOSSES))

    def margin(c, r, beta):
        return -beta * (c - r)

    dpo_losses._loss("the margin itself")(margin)
    args = posttrain_jai.mode_parser("dpo").parse_args(["--dpo-loss", "margin"])
    losses, _, _ = dpo_losses.dpo_loss(*torch.tensor([[1.0], [0.0], [0.0], [0.0]]), beta=2.0,
                                       loss_type=args.dpo_loss)
    assert losses.tolist() == [-2.0]
