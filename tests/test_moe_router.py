"""Router: losses against hand-computed values, capacity dropping, expert bias, statistics.

The fixture routes 4 tokens over 4 experts (top-2) with router probabilities chosen by hand
(logits = log p + a per-token shift, so softmax gives p back exactly and logsumexp = the shift):

    token  p(e0)  p(e1)  p(e2)  p(e3)   top-2    shift
      0    0.50   0.30   0.10   0.10    e0 e1     0.0
      1    0.10   0.60   0.20   0.10    e1 e2     1.0
      2    0.20   0.10   0.40   0.30    e2 e3    -2.0
      3    0.60   0.25   0.10   0.05    e0 e1     0.5

slots per expert f*8 = [2, 3, 2, 1]; summed probabilities = [1.4, 1.25, 0.8, 0.55].
"""
import math
import os

import pytest
import torch
from conftest import REPO_ROOT

from megatron_jai.moe.router import (
    RouterOptions,
    TopKRouter,
    drop_over_capacity,
    expert_capacity,
    load_balancing_loss,
    routing_entropy,
    z_loss,
)

P = torch.tensor([[0.50, 0.30, 0.10, 0.10],
                  [0.10, 0.60, 0.20, 0.10],
                  [0.20, 0.10, 0.40, 0.30],
                  [0.60, 0.25, 0.10, 0.05]], dtype=torch.float64)
SHIFT = torch.tensor([0.0, 1.0, -2.0, 0.5], dtype=torch.float64)
LOGITS = torch.log(P) + SHIFT[:, None]
TOP2 = torch.tensor([[0, 1], [1, 2], [2, 3], [0, 1]])
# Hand-computed: aux = E / (k T^2) * sum_e count_e * sum_t p[t, e]
#   = 4 / (2 * 16) * (2 * 1.4 + 3 * 1.25 + 2 * 0.8 + 1 * 0.55) = 0.125 * 8.7 = 1.0875
AUX_UNIT = 1.0875
# z = mean_t shift_t^2 = (0 + 1 + 4 + 0.25) / 4
Z_UNIT = 1.3125


def _config(hidden=4):
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(num_layers=1, hidden_size=hidden, num_attention_heads=1,
                             use_cpu_initialization=True, params_dtype=torch.float32)


def _router(**opts):
    """A router on 4-dim one-hot tokens whose weight makes logits = LOGITS exactly."""
    options = RouterOptions(num_experts=4, **opts)
    router = TopKRouter(_config(), options)
    with torch.no_grad():
        router.weight.copy_(LOGITS.t().float())  # x_t = e_t  ->  logits_t = W[:, t]... = LOGITS[t]
    return router, torch.eye(4, requires_grad=True)


def test_hand_fixture_is_what_the_docstring_says():
    probs = torch.softmax(LOGITS, -1)
    torch.testing.assert_close(probs, P)
    assert torch.equal(torch.topk(probs, 2).indices, TOP2)


def test_load_balancing_loss_hand_value():
    loss = load_balancing_loss(P, TOP2, top_k=2, coeff=0.01)
    assert loss.item() == pytest.approx(0.01 * AUX_UNIT, rel=1e-12)
    # perfectly balanced uniform routing gives the minimum, coeff * 1
    uniform = torch.full((4, 4), 0.25, dtype=torch.float64)
    balanced = torch.tensor([[0, 1], [2, 3], [0, 1], [2, 3]])
    assert load_balancing_loss(uniform, balanced, 2, 1.0).item() == pytest.approx(1.0)
    # padding tokens excluded: only tokens 0 and 1 -> counts [1,2,1,0], P sums [.6,.9,.3,.2], T=2
    mask = torch.tensor([True, True, False, False])
    expected = 4 / (2 * 4) * (1 * 0.6 + 2 * 0.9 + 1 * 0.3 + 0 * 0.2)
    assert load_balancing_loss(P, TOP2, 2, 1.0, token_mask=mask).item() == pytest.approx(expected)


def test_z_loss_and_entropy_hand_values():
    assert z_loss(LOGITS, 1e-3).item() == pytest.approx(1e-3 * Z_UNIT, rel=1e-12)
    ent = -(P * P.log()).sum(-1).mean()
    assert routing_entropy(P).item() == pytest.approx(ent.item(), rel=1e-12)
    assert routing_entropy(torch.full((3, 4), 0.25)).item() == pytest.approx(math.log(4), rel=1e-6)


def test_router_forward_weights_and_losses_join_the_graph():
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    router, x = _router(top_k=2, aux_loss_coeff=0.01, z_loss_coeff=1e-3)
    router.train()
    r = router(x)
    assert torch.equal(r.expert_ids, TOP2)
    expected_w = torch.gather(P, 1, TOP2)
    expected_w = expected_w / expected_w.sum(-1, keepdim=True)  # t0: [0.625, 0.375]
    torch.testing.assert_close(r.weights.double(), expected_w, rtol=1e-6, atol=1e-7)
    assert r.weights.dtype == torch.float32 and r.logits.dtype == torch.float32

    # With no gradient from the main loss, backward still delivers d(aux + z)/dW: the losses
    # ride on the graph (MoEAuxLossAutoScaler, scale 1 outside the pipeline schedules).
    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0))
    (r.weights.sum() * 0).backward()
    got = router.weight.grad.clone()
    w = router.weight.detach().double().requires_grad_(True)
    logits = x.detach().double() @ w.t()
    probs = torch.softmax(logits, -1)
    ref = load_balancing_loss(probs, TOP2, 2, 0.01) + z_loss(logits, 1e-3)
    assert ref.item() == pytest.approx(0.01 * AUX_UNIT + 1e-3 * Z_UNIT, rel=1e-6)
    ref.backward()
    torch.testing.assert_close(got.double(), w.grad, rtol=1e-5, atol=1e-8)
    assert got.abs().sum() > 0

    # The scale set by the schedules (1 / num_microbatches) scales the loss gradients.
    router.weight.grad = None
    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(0.5))
    r = router(x)
    (r.weights.sum() * 0).backward()
    torch.testing.assert_close(router.weight.grad, 0.5 * got)
    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0))


def test_no_losses_in_eval_and_unnormalized_option():
    router, x = _router(top_k=2, normalize_topk=False, aux_loss_coeff=0.01, z_loss_coeff=1e-3)
    router.eval()
    r = router(x)
    torch.testing.assert_close(r.weights.double(), torch.gather(P, 1, TOP2), rtol=1e-6, atol=1e-7)
    r.weights.sum().backward()
    # eval: only the routing-weight gradient, no loss term: d(sum of top-2 probs)/dW
    w = router.weight.detach().double().requires_grad_(True)
    torch.gather(torch.softmax(x.detach().double() @ w.t(), -1), 1, TOP2).sum().backward()
    torch.testing.assert_close(router.weight.grad.double(), w.grad, rtol=1e-5, atol=1e-8)


def test_capacity_drops_the_right_tokens():
    # capacity = ceil(4 tokens * 2 / 4 experts * 0.5) = 1 slot per expert
    assert expert_capacity(4, 4, 2, 0.5) == 1
    assert expert_capacity(4, 4, 2, 1.25) == 3
    w = torch.gather(P, 1, TOP2)
    # "probs": e0 keeps t3 (0.6 > 0.5), e1 keeps t1 (0.6), e2 keeps t2 (0.4 > 0.2), e3 keeps t2
    ids, kept_w = drop_over_capacity(TOP2, w, P, capacity=1, policy="probs")
    assert ids.tolist() == [[-1, -1], [1, -1], [2, 3], [0, -1]]
    assert kept_w.tolist() == [[0.0, 0.0], [0.6, 0.0], [0.4, 0.3], [0.6, 0.0]]
    # "position": the earliest token wins each expert: e0,e1 -> t0, e2 -> t1, e3 -> t2
    ids, _ = drop_over_capacity(TOP2, w, P, capacity=1, policy="position")
    assert ids.tolist() == [[0, 1], [-1, 2], [-1, 3], [-1, -1]]
    # capacity 2: only e1 (3 slots) overflows; its lowest-probability slot (t3, 0.25) goes
    ids, _ = drop_over_capacity(TOP2, w, P, capacity=2, policy="probs")
    assert ids.tolist() == [[0, 1], [1, 2], [2, 3], [0, -1]]
    # ties keep the earlier token
    flat = torch.full((3, 2), 0.5, dtype=torch.float64)
    ids, _ = drop_over_capacity(torch.tensor([[0, 1]] * 3), flat, flat, capacity=2, policy="probs")
    assert ids.tolist() == [[0, 1], [0, 1], [-1, -1]]


def test_router_with_capacity_reports_drops_and_keeps_weights():
    from megatron_jai.moe.layer import collect_router_stats

    router, x = _router(top_k=2, capacity_factor=0.5)
    router.layer_number = 3
    r = router(x)
    assert r.expert_ids.tolist() == [[-1, -1], [1, -1], [2, 3], [0, -1]]
    norm = torch.gather(P, 1, TOP2)
    norm = (norm / norm.sum(-1, keepdim=True)).float()
    torch.testing.assert_close(r.weights[2], norm[2])  # dropped weight is not redistributed
    assert r.weights[1, 1] == 0 and r.weights[0].abs().sum() == 0

    stats = collect_router_stats(router)
    assert stats["moe/layer03/dropped_fraction"] == pytest.approx(4 / 8)
    assert stats["moe/dropped_fraction"] == pytest.approx(0.5)
    # kept slots: e0 1, e1 1, e2 1, e3 1
    assert [stats[f"moe/layer03/load_e{e}"] for e in range(4)] == [0.25] * 4
    ent = -(P * P.log()).sum(-1).mean().item()
    assert stats["moe/entropy"] == pytest.approx(ent, rel=1e-5)
    assert collect_router_stats(router) == {}  # read resets


def test_stats_accumulate_over_calls():
    from megatron_jai.moe.layer import collect_router_stats

    router, x = _router(top_k=2, aux_loss_coeff=0.01)
    router.layer_number = 1
    router.train()
    router(x)
    router(x)
    stats = collect_router_stats(router)
    # dropless: counts [2,3,2,1] twice -> load fractions [2,3,2,1]/8, max/mean = 3/2
    assert [stats[f"moe/layer01/load_e{e}"] for e in range(4)] == pytest.approx([0.25, 0.375, 0.25, 0.125])
    assert stats["moe/max_load"] == pytest.approx(1.5)
    assert stats["moe/aux_loss"] == pytest.approx(0.01 * AUX_UNIT, rel=1e-5)
    assert stats["moe/dropped_fraction"] == 0.0


def test_expert_bias_steers_selection_not_weights_and_updates_by_sign():
    from megatron_jai.moe.layer import update_expert_biases

    router, x = _router(top_k=2, expert_bias=True, expert_bias_update_rate=0.1)
    router.train()
    with torch.no_grad():
        router.expert_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 1.0]))
    r = router(x)
    # e3 is always chosen (bias 1 > any probability gap); the other choice is the top-1 by p
    assert sorted(map(sorted, r.expert_ids.tolist())) == sorted([[0, 3], [1, 3], [2, 3], [0, 3]])
    p_sel = torch.gather(P, 1, r.expert_ids)
    torch.testing.assert_close(r.weights.double(), p_sel / p_sel.sum(-1, keepdim=True),
                               rtol=1e-6, atol=1e-7)
    # counts [2, 1, 1, 4], mean 2: e0 stays, e1 and e2 rise, e3 falls
    assert router.local_tokens_per_expert.tolist() == [2, 1, 1, 4]
    assert update_expert_biases(router) == 1
    torch.testing.assert_close(router.expert_bias, torch.tensor([0.0, 0.1, 0.1, 0.9]))
    assert router.local_tokens_per_expert.sum() == 0
    assert "expert_bias" in router.state_dict()
    # bf16 model casts keep the bias in fp32 (bf16 would swallow small update steps)
    router.bfloat16()
    assert router.expert_bias.dtype == torch.float32 and router.weight.dtype == torch.bfloat16
    torch.testing.assert_close(router.expert_bias, torch.tensor([0.0, 0.1, 0.1, 0.9]))


def test_options_are_validated():
    with pytest.raises(ValueError, match="top_k"):
        RouterOptions(num_experts=4, top_k=5)
    with pytest.raises(ValueError, match="capacity_factor"):
        RouterOptions(num_experts=4, capacity_factor=0.0)
    with pytest.raises(ValueError, match="drop_policy"):
        RouterOptions(num_experts=4, drop_policy="random")


def test_moe_config_takes_sequence_parallelism_and_refuses_bad_layouts():
    from megatron_jai.presets import TINY_MOE, load_model_config
    from megatron_jai.training.arguments import parse_args

    # The flagship job's layout (examples/jai_75b.yaml: TP=2 with sequence parallelism, EP=4).
    args = parse_args(["--config", os.path.join(REPO_ROOT, "examples", "jai_75b.yaml")])
    assert args.sequence_parallel and (args.tp, args.pp, args.ep) == (2, 8, 4)
    tcfg = load_model_config(args.model).transformer_config(
        tp=args.tp, pp=args.pp, ep=args.ep, sequence_parallel=True, params_dtype=torch.bfloat16)
    assert tcfg.sequence_parallel and tcfg.num_moe_experts == 4
    assert not TINY_MOE.transformer_config(tp=1, sequence_parallel=True).sequence_parallel
    with pytest.raises(ValueError, match="must divide num_experts"):
        TINY_MOE.transformer_config(ep=3)
    # top-k weights renormalised = Megatron's "not pre-softmax"
    assert TINY_MOE.transformer_config().moe_router_pre_softmax is False
    assert TINY_MOE.replace(moe_normalize_topk=False).transformer_config().moe_router_pre_softmax
