"""DPO's losses, one registry entry each, with the names and formulas of TRL's ``DPOTrainer``
(trl 1.16; ``tests/test_dpo_losses.py`` runs TRL's own code against every entry).

With ``c = pi_chosen - ref_chosen`` and ``r = pi_rejected - ref_rejected`` the log-ratios of a
pair's answers (policy ``pi`` against reference ``ref``, log-probabilities summed over the answer,
or averaged over its tokens where the entry is ``length_normalised``) and ``h = c - r``, each entry
gives the loss of one pair. An entry declares what it needs: a reference model, length-normalised
log-probabilities, its hyper-parameters (flags ``--dpo-<name>``, defaults and valid ranges in
:data:`HYPERPARAMETERS`). Adding a loss is one decorated function here: ``--dpo-loss`` choices, its
help and the objective follow.

Besides the preference loss, ``--dpo-nll-weight w`` adds TRL's NLL term (RPO: TRL's ``sft`` loss
type with weight ``w``): ``w`` x the mean NLL over the chosen answers' tokens of the global batch.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from megatron_jai.training.faults import TrainingError


@dataclass(frozen=True)
class Hyperparameter:
    name: str  # flag --dpo-<name>, argument dpo_<name>
    default: float
    help: str
    rule: str  # what a valid value is, as the error says it
    valid: Callable[[float], bool]

    @property
    def flag(self) -> str:
        return "--dpo-" + self.name.replace("_", "-")

    @property
    def dest(self) -> str:
        return "dpo_" + self.name

    def error(self, value) -> str:
        """None for a valid value, else the one-line reason."""
        try:
            ok = math.isfinite(float(value)) and self.valid(float(value))
        except (TypeError, ValueError):
            ok = False
        return None if ok else f"{self.flag} must be {self.rule}, got {value!r}"

    def parse(self, text: str) -> float:
        """argparse ``type``: the flag's value, checked where it is parsed."""
        error = self.error(text)
        if error:
            raise argparse.ArgumentTypeError(f"must be {self.rule}, got {text!r}")
        return float(text)


HYPERPARAMETERS = {h.name: h for h in (
    Hyperparameter("beta", 0.1, "beta: how far the policy may move from the reference (IPO: its "
                   "tau)", "> 0", lambda v: v > 0),
    Hyperparameter("label_smoothing", 0.0, "probability that a preference label is flipped "
                   "(sigmoid: cDPO; robust)", "in [0, 0.5)", lambda v: 0 <= v < 0.5),
    Hyperparameter("nll_weight", 0.0, "weight of TRL's NLL term (RPO): the mean NLL of the "
                   "chosen answers' tokens (0 = off)", ">= 0", lambda v: v >= 0),
)}


@dataclass(frozen=True)
class DPOLoss:
    name: str
    summary: str  # for --help; the formula is the function's docstring
    per_pair: Callable  # (c, r, beta, <hyper-parameters>) -> loss of each pair
    reference: bool = True  # needs reference log-probs
    length_normalised: bool = False  # c and r from log-probs averaged over the answer's tokens
    hyperparameters: tuple = ("beta",)


LOSSES: dict = {}
DEFAULT_LOSS = "sigmoid"


def _loss(summary: str, hyperparameters: tuple = ("beta",), **needs):
    def register(fn: Callable) -> Callable:
        LOSSES[fn.__name__] = DPOLoss(fn.__name__, summary, fn, hyperparameters=hyperparameters,
                                      **needs)
        return fn
    return register


@_loss("DPO; cDPO with --dpo-label-smoothing", hyperparameters=("beta", "label_smoothing"))
def sigmoid(c, r, beta, label_smoothing):
    """``-(1 - ls) log sigmoid(beta h) - ls log sigmoid(-beta h)``"""
    h = c - r
    losses = -F.logsigmoid(beta * h)
    if label_smoothing:
        losses = (1 - label_smoothing) * losses - label_smoothing * F.logsigmoid(-beta * h)
    return losses


@_loss("SLiC")
def hinge(c, r, beta):
    """``relu(1 - beta h)``"""
    return torch.relu(1 - beta * (c - r))


@_loss("IPO, length-normalised", length_normalised=True)
def ipo(c, r, beta):
    """``(h - 1 / (2 beta))^2``"""
    return (c - r - 1.0 / (2.0 * beta)) ** 2


@_loss("robust DPO, --dpo-label-smoothing flips", hyperparameters=("beta", "label_smoothing"))
def robust(c, r, beta, label_smoothing):
    """``(-(1 - ls) log sigmoid(beta h) + ls log sigmoid(-beta h)) / (1 - 2 ls)``"""
    h = c - r
    return (-(1 - label_smoothing) * F.logsigmoid(beta * h)
            + label_smoothing * F.logsigmoid(-beta * h)) / (1 - 2 * label_smoothing)


@_loss("SPPO, hard probabilities")
def sppo_hard(c, r, beta):
    """``(c - 1 / (2 beta))^2 + (r + 1 / (2 beta))^2``"""
    return (c - 0.5 / beta) ** 2 + (r + 0.5 / beta) ** 2


@_loss("APO-zero: chosen answers better than the policy's")
def apo_zero(c, r, beta):
    """``1 - sigmoid(beta c) + sigmoid(beta r)``"""
    return 1 - torch.sigmoid(beta * c) + torch.sigmoid(beta * r)


@_loss("APO-down: chosen answers worse than the policy's")
def apo_down(c, r, beta):
    """``sigmoid(beta c) + 1 - sigmoid(beta h)``"""
    return torch.sigmoid(beta * c) + 1 - torch.sigmoid(beta * (c - r))


@_loss("NCA, pairwise")
def nca_pair(c, r, beta):
    """``-log sigmoid(beta c) - log sigmoid(-beta c) / 2 - log sigmoid(-beta r) / 2``"""
    return (-F.logsigmoid(beta * c) - 0.5 * F.logsigmoid(-beta * c)
            - 0.5 * F.logsigmoid(-beta * r))


@_loss("BCO, pairwise")
def bco_pair(c, r, beta):
    """``-log sigmoid(beta c) - log sigmoid(-beta r)``"""
    return -F.logsigmoid(beta * c) - F.logsigmoid(-beta * r)


@_loss("DPO, length-normalised", length_normalised=True)
def sigmoid_norm(c, r, beta):
    """``-log sigmoid(beta h)``"""
    return -F.logsigmoid(beta * (c - r))


def loss_values(args, entry: DPOLoss) -> dict:
    """The entry's hyper-parameters from the arguments (``beta``, ``label_smoothing``, ...)."""
    return {name: getattr(args, HYPERPARAMETERS[name].dest) for name in entry.hyperparameters}


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
             ref_chosen: torch.Tensor, ref_rejected: torch.Tensor, beta: float,
             loss_type: str = DEFAULT_LOSS, **hyperparameters) -> tuple:
    """Per-pair losses of ``loss_type`` and the (detached) chosen / rejected rewards
    ``beta * log-ratio``. Inputs are per-pair log-probabilities as the loss takes them (summed
    over the answer, or length-normalised for a ``length_normalised`` entry); hyper-parameters
    not given take their defaults."""
    if loss_type not in LOSSES:
        raise ValueError(f"unknown DPO loss {loss_type!r} (choose from {', '.join(LOSSES)})")
    entry = LOSSES[loss_type]
    values = {name: hyperparameters.get(name, HYPERPARAMETERS[name].default)
              for name in entry.hyperparameters}
    values["beta"] = beta
    chosen, rejected = policy_chosen - ref_chosen, policy_rejected - ref_rejected
    losses = entry.per_pair(chosen, rejected, **values)
    return losses, beta * chosen.detach(), beta * rejected.detach()


# ---- command line ------------------------------------------------------------------------------
def add_loss_arguments(group) -> None:
    """``--dpo-loss`` (one choice per entry) and every hyper-parameter flag."""
    group.add_argument("--dpo-loss", choices=list(LOSSES), default=DEFAULT_LOSS, metavar="LOSS",
                       help="the preference loss, TRL's: " + ", ".join(
                           f"{e.name} ({e.summary})" for e in LOSSES.values())
                       + f" (default: {DEFAULT_LOSS})"),
    for h in HYPERPARAMETERS.values():
        group.add_argument(h.flag, type=h.parse, default=h.default,
                           help=f"{h.help}; {h.rule} (default {h.default:g})")


def loss_defaults() -> dict:
    """The arguments of the loss flags at their defaults (for a mode that has no such flags)."""
    return {"dpo_loss": DEFAULT_LOSS, **{h.dest: h.default for h in HYPERPARAMETERS.values()}}


def check_loss_arguments(args) -> None:
    """The values a config file gave (flags are checked as they are parsed)."""
    if args.dpo_loss not in LOSSES:
        raise TrainingError(f"--dpo-loss {args.dpo_loss!r}: choose from {', '.join(LOSSES)}")
    for h in HYPERPARAMETERS.values():
        error = h.error(getattr(args, h.dest))
        if error:
            raise TrainingError(error)
