"""The MoE router: fp32 linear gate, softmax, top-k, load-balancing losses, capacity, statistics.

Per token ``t`` with hidden state ``x_t`` (``T`` tokens, ``E`` experts, ``k`` choices):

* ``logits = x_t @ W^T`` in fp32 (``W`` = ``router.weight`` ``[E, H]``), ``probs = softmax(logits)``;
* selection: the ``k`` largest ``probs + expert_bias`` (the bias is zero unless aux-loss-free
  balancing is on; it only steers *which* experts are chosen, never the weights);
* weights: the chosen ``probs``, renormalised to sum to 1 when ``normalize_topk`` (Mixtral);
* capacity (optional, ``capacity_factor`` not None): each expert keeps at most
  ``ceil(T * k / E * capacity_factor)`` slots; the rest are dropped (expert id -1, weight 0) --
  by lowest router probability (``drop_policy="probs"``) or latest position (``"position"``),
  ties broken by position. Dropped weight is not redistributed;
* losses (training only), attached to the autograd graph with Megatron-Core's
  ``MoEAuxLossAutoScaler`` so they join the main loss without the training loop doing anything:
  load balancing (Switch/GShard) ``aux = coeff * E / (k * T^2) * sum_e count_e * sum_t probs[t, e]``
  (``count_e`` = slots chosen for expert ``e`` before capacity dropping) and router z-loss
  ``z = coeff * mean_t logsumexp(logits_t)^2``. With sequence parallelism the TP ranks route the
  same gathered tokens and their router gradients are summed over TP, so each attaches
  ``1 / tp_replicas`` of the losses (the statistics keep the whole values).

Statistics (tokens per expert, dropped slots, routing entropy, loss values) are accumulated per
router and read (and reset) by :func:`megatron_jai.moe.layer.collect_router_stats`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

from megatron_jai.config import DROP_POLICIES


@dataclass(frozen=True)
class RouterOptions:
    """What the router does; built from the ModelConfig by ``moe_layer_spec``."""

    num_experts: int
    top_k: int = 2
    normalize_topk: bool = True
    aux_loss_coeff: float = 0.0
    z_loss_coeff: float = 0.0
    capacity_factor: Optional[float] = None  # None = dropless
    drop_policy: str = "probs"
    expert_bias: bool = False  # aux-loss-free balancing (bias on the selection scores)
    expert_bias_update_rate: float = 1e-3

    def __post_init__(self):
        if self.num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {self.num_experts}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={self.num_experts}], got {self.top_k}")
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            raise ValueError(f"capacity_factor must be > 0 (or None for dropless), "
                             f"got {self.capacity_factor}")
        if self.drop_policy not in DROP_POLICIES:
            raise ValueError(f"drop_policy must be one of {DROP_POLICIES}, got {self.drop_policy!r}")


class Routing(NamedTuple):
    expert_ids: torch.Tensor  # [T, k] int64 global expert ids, -1 = dropped
    weights: torch.Tensor  # [T, k] fp32 routing weights (0 where dropped)
    logits: torch.Tensor  # [T, E] fp32
    probs: torch.Tensor  # [T, E] fp32 softmax


# ---- pure functions (hand-checkable; the tests compute the same numbers by hand) -----------------

def expert_capacity(num_tokens: int, num_experts: int, top_k: int, capacity_factor: float) -> int:
    """Slots each expert may take: ``ceil(T * k / E * capacity_factor)``."""
    return int(math.ceil(num_tokens * top_k / num_experts * capacity_factor))


def tokens_per_expert(expert_ids: torch.Tensor, num_experts: int,
                      token_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``[E]`` int64 number of slots routed to each expert; ids outside ``[0, E)`` and tokens with
    ``token_mask`` False are not counted. No host synchronisation."""
    valid = (expert_ids >= 0) & (expert_ids < num_experts)
    if token_mask is not None:
        valid = valid & token_mask[:, None]
    keys = torch.where(valid, expert_ids, torch.full_like(expert_ids, num_experts)).reshape(-1)
    counts = torch.zeros(num_experts + 1, dtype=torch.long, device=expert_ids.device)
    counts.scatter_add_(0, keys, torch.ones_like(keys))
    return counts[:num_experts]


def load_balancing_loss(probs: torch.Tensor, expert_ids: torch.Tensor, top_k: int,
                        coeff: float, token_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Switch/GShard loss ``coeff * E * sum_e f_e * P_e``: ``f_e`` = fraction of the ``T * k`` slots
    routed to ``e``, ``P_e`` = mean router probability of ``e``. Differentiable through ``probs``.
    ``token_mask`` ``[T]`` (True = real token) excludes padding from ``T``, ``f`` and ``P``."""
    num_experts = probs.shape[-1]
    if token_mask is not None:
        probs = probs * token_mask[:, None]
        num_tokens = token_mask.sum().clamp(min=1).to(probs.dtype)
    else:
        num_tokens = torch.tensor(float(probs.shape[0]), dtype=probs.dtype, device=probs.device)
    counts = tokens_per_expert(expert_ids, num_experts, token_mask).to(probs.dtype)
    return coeff * num_experts / (top_k * num_tokens * num_tokens) * torch.sum(counts * probs.sum(0))


def z_loss(logits: torch.Tensor, coeff: float,
           token_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Router z-loss (ST-MoE): ``coeff * mean_t logsumexp(logits_t)^2``."""
    sq = torch.logsumexp(logits, dim=-1).square()
    if token_mask is None:
        return coeff * sq.mean()
    return coeff * (sq * token_mask).sum() / token_mask.sum().clamp(min=1)


def routing_entropy(probs: torch.Tensor, token_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean over tokens of the entropy (nats) of the router distribution."""
    ent = -(probs * torch.log(probs.clamp(min=1e-20))).sum(-1)
    if token_mask is None:
        return ent.mean()
    return (ent * token_mask).sum() / token_mask.sum().clamp(min=1)


def drop_over_capacity(expert_ids: torch.Tensor, weights: torch.Tensor, probs: torch.Tensor,
                       capacity: int, policy: str = "probs"):
    """Keep at most ``capacity`` slots per expert; returns ``(expert_ids, weights)`` with the
    dropped slots set to -1 / 0. ``policy="probs"`` keeps the slots with the highest router
    probability for that expert, ``"position"`` the earliest tokens; ties go to the earlier token."""
    if policy not in DROP_POLICIES:
        raise ValueError(f"drop_policy must be one of {DROP_POLICIES}, got {policy!r}")
    num_tokens, k = expert_ids.shape
    num_experts = probs.shape[-1]
    valid = expert_ids >= 0
    routed = torch.zeros(num_tokens, num_experts, dtype=torch.bool, device=expert_ids.device)
    routed.scatter_(1, expert_ids.clamp(min=0), valid)
    priority = probs.detach() if policy == "probs" else torch.zeros_like(probs)
    priority = torch.where(routed, priority, torch.full_like(priority, -math.inf))
    # Stable descending sort down each expert's column: equal priorities keep token order.
    order = torch.sort(priority, dim=0, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(0, order, torch.arange(num_tokens, device=order.device)[:, None].expand_as(order))
    kept = routed & (rank < capacity)
    keep_slot = torch.gather(kept, 1, expert_ids.clamp(min=0)) & valid
    return (torch.where(keep_slot, expert_ids, torch.full_like(expert_ids, -1)),
            torch.where(keep_slot, weights, torch.zeros_like(weights)))


# ---- the module ------------------------------------------------------------------------------

class RouterStats:
    """Running sums of one router's statistics since the last :meth:`reset`, kept as tensors on the
    router's device (no host synchronisation in the forward pass)."""

    FIELDS = ("calls", "tokens", "dropped_slots", "entropy_sum", "aux_loss_sum", "z_loss_sum")

    def __init__(self, num_experts: int):
        self.num_experts = num_experts
        self.reset()

    def reset(self):
        self.sums = None  # [len(FIELDS)] float64
        self.tokens_per_expert = None  # [E] float64

    def update(self, counts, dropped, entropy, num_tokens, aux=None, z=None):
        zero = torch.zeros((), dtype=torch.float64, device=counts.device)
        row = torch.stack([zero + 1, zero + num_tokens, zero + dropped, zero + entropy,
                           zero + (0.0 if aux is None else aux), zero + (0.0 if z is None else z)])
        if self.sums is None:
            self.sums, self.tokens_per_expert = row, counts.to(torch.float64)
        else:
            self.sums = self.sums + row
            self.tokens_per_expert = self.tokens_per_expert + counts

    def read(self) -> Optional[dict]:
        """The sums as Python numbers (one host synchronisation), or None if nothing was routed."""
        if self.sums is None:
            return None
        values = dict(zip(self.FIELDS, self.sums.tolist()))
        values["tokens_per_expert"] = self.tokens_per_expert.tolist()
        return values


class TopKRouter(MegatronModule):
    """Linear gate ``weight`` ``[E, H]`` (replicated), routing in fp32 (see the module docstring).
    Under sequence parallelism the weight carries Megatron's ``sequence_parallel`` marker, so
    ``finalize_model_grads`` sums its (partial) gradient over TP.

    Buffers: ``expert_bias`` ``[E]`` (persistent, in checkpoints, only with ``expert_bias=True``) and
    ``local_tokens_per_expert`` ``[E]`` (slots counted since the last bias update; not saved).
    """

    def __init__(self, config, options: RouterOptions):
        super().__init__(config)
        self.options = options
        self.layer_number = None
        self.weight = torch.nn.Parameter(torch.empty(options.num_experts, config.hidden_size,
                                                     dtype=torch.float32))
        if config.perform_initialization:
            # The default generator is seeded identically on every rank, so replicas agree.
            config.init_method(self.weight)
        self.weight.data = self.weight.data.to(config.params_dtype)
        self.weight.sequence_parallel = config.sequence_parallel
        if options.expert_bias:
            self.register_buffer("expert_bias", torch.zeros(options.num_experts, dtype=torch.float32))
            self.register_buffer("local_tokens_per_expert",
                                 torch.zeros(options.num_experts, dtype=torch.long),
                                 persistent=False)
        self.stats = RouterStats(options.num_experts)

    def _apply(self, fn, recurse=True):
        # Module-wide casts (Float16Module's .bfloat16(), .half()) must not round the expert bias:
        # steps of expert_bias_update_rate would vanish in bf16. Devices move; the dtype stays fp32.
        bias = self._buffers.get("expert_bias")
        super()._apply(fn, recurse)
        if bias is not None:
            self._buffers["expert_bias"] = bias.to(device=self._buffers["expert_bias"].device,
                                                   dtype=torch.float32)
        return self

    def set_layer_number(self, layer_number: int):
        self.layer_number = layer_number

    def forward(self, hidden: torch.Tensor, token_mask: Optional[torch.Tensor] = None,
                tp_replicas: int = 1) -> Routing:
        """hidden ``[T, H]`` (any dtype); ``token_mask`` ``[T]`` bool, True = real token (padding is
        routed but excluded from losses and statistics); ``tp_replicas``: TP ranks that route these
        same tokens and sum their router gradients (sequence parallelism): each attaches that
        share of the losses."""
        opt = self.options
        logits = torch.nn.functional.linear(hidden.float(), self.weight.float())
        with_losses = self.training and torch.is_grad_enabled()
        zl = None
        if with_losses and opt.z_loss_coeff > 0:
            # Attached before the softmax, so every use of the routing carries its gradient.
            zl = z_loss(logits, opt.z_loss_coeff, token_mask)
            logits = MoEAuxLossAutoScaler.apply(logits, zl / tp_replicas)
        probs = torch.softmax(logits, dim=-1)
        scores = probs
        if opt.expert_bias:
            scores = probs.detach() + self.expert_bias
        _, expert_ids = torch.topk(scores, opt.top_k, dim=-1)
        weights = torch.gather(probs, 1, expert_ids)
        if opt.normalize_topk:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        chosen_ids = expert_ids
        if opt.capacity_factor is not None:
            capacity = expert_capacity(hidden.shape[0], opt.num_experts, opt.top_k,
                                       opt.capacity_factor)
            expert_ids, weights = drop_over_capacity(expert_ids, weights, probs, capacity,
                                                     opt.drop_policy)

        aux = None
        if with_losses and opt.aux_loss_coeff > 0:
            aux = load_balancing_loss(probs, chosen_ids, opt.top_k, opt.aux_loss_coeff, token_mask)
            weights = MoEAuxLossAutoScaler.apply(weights, aux / tp_replicas)
        self._record(probs, chosen_ids, expert_ids, token_mask, aux, zl)
        return Routing(expert_ids, weights, logits, probs)

    @torch.no_grad()
    def _record(self, probs, chosen_ids, kept_ids, token_mask, aux, zl):
        num_experts = self.options.num_experts
        counts = tokens_per_expert(kept_ids, num_experts, token_mask)
        dropped = counts.new_zeros(())
        if self.options.capacity_factor is not None:
            dropped = (tokens_per_expert(chosen_ids, num_experts, token_mask) - counts).sum()
        num_tokens = chosen_ids.shape[0] if token_mask is None else token_mask.sum()
        if self.options.expert_bias and self.training:
            self.local_tokens_per_expert += tokens_per_expert(chosen_ids, num_experts, token_mask)
        self.stats.update(counts, dropped, routing_entropy(probs, token_mask), num_tokens,
                          None if aux is None else aux.detach(), None if zl is None else zl.detach())

    @torch.no_grad()
    def update_expert_bias(self, global_tokens_per_expert: torch.Tensor) -> None:
        """Aux-loss-free balancing step: raise the bias of under-loaded experts, lower the
        over-loaded ones, by ``expert_bias_update_rate`` (sign of the load error)."""
        counts = global_tokens_per_expert.float()
        error = counts.mean() - counts
        self.expert_bias += torch.sign(error) * self.options.expert_bias_update_rate
        self.local_tokens_per_expert.zero_()
