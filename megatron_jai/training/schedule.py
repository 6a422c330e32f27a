"""Learning-rate schedules: one Megatron-Core ``OptimizerParamScheduler`` per phase.

What the run asks for is what runs:

* the first step of a phase uses that phase's own schedule (its warm-up start, or its peak with no
  warm-up), not whatever the previous phase left in the optimizer's parameter groups;
* the ``lr`` a step logs is the rate its update used;
* a resume whose schedule differs from the checkpoint's (another ``--lr``, a longer phase, ...)
  says which values differ and which are used: the command line's, or with
  ``--use-checkpoint-schedule`` the checkpoint's.
"""
from __future__ import annotations

from megatron_jai.training.faults import TrainingError

# --min-lr not given: this fraction of the phase's peak.
DEFAULT_MIN_LR_FRACTION = 0.1

# OptimizerParamScheduler.state_dict() keys a user can change, and how to name them.
SCHEDULE_FIELDS = {
    "max_lr": "peak LR",
    "min_lr": "min LR",
    "lr_warmup_steps": "warm-up steps",
    "lr_decay_steps": "decay steps",
    "lr_decay_style": "decay style",
    "start_wd": "weight decay",
    "end_wd": "final weight decay",
    "wd_incr_steps": "weight-decay steps",
    "wd_incr_style": "weight-decay style",
}


def phase_schedule(args, phase, iters: int) -> dict:
    """The schedule of ``phase`` (``iters`` steps) from its own settings and the run's flags."""
    scale = phase.lr_scale
    peak = phase.lr if phase.lr is not None else args.lr
    min_lr = phase.min_lr if phase.min_lr is not None else args.min_lr
    if min_lr is None:
        min_lr = peak * DEFAULT_MIN_LR_FRACTION
    if min_lr > peak:  # an error, never a silent clamp
        raise TrainingError(f"phase {phase.name}: min_lr {min_lr:g} is above its lr {peak:g} "
                            f"(--min-lr / --lr or the phase's own): the minimum learning rate "
                            f"must be <= the peak")
    max_lr, min_lr = peak * scale, min_lr * scale
    decay = phase.lr_decay_iters or args.lr_decay_iters or iters
    warmup = phase.warmup_iters if phase.warmup_iters is not None else args.warmup_iters
    style = phase.lr_decay_style or args.lr_decay_style
    schedule = {
        "max_lr": float(max_lr), "min_lr": float(min_lr),
        "lr_warmup_steps": min(warmup, max(decay - 1, 0)), "lr_decay_steps": decay,
        "lr_decay_style": style,
        "start_wd": args.weight_decay, "end_wd": args.weight_decay, "wd_incr_steps": decay,
        "wd_incr_style": "constant",
        "wsd_decay_steps": None, "lr_wsd_decay_style": None,
    }
    if style == "WSD":
        wsd = args.lr_wsd_decay_iters
        if not wsd or wsd > decay:
            raise TrainingError(f"phase {phase.name}: --lr-decay-style WSD needs "
                                f"--lr-wsd-decay-iters between 1 and the decay length {decay}")
        schedule.update(wsd_decay_steps=wsd, lr_wsd_decay_style=args.lr_wsd_decay_style)
    return schedule


def build_scheduler(optimizer, schedule: dict):
    """A scheduler at step 0 of ``schedule``; the optimizer's rates are already this phase's."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    # Megatron-Core's parameter groups carry max_lr/min_lr of their own (from OptimizerConfig),
    # which win over the scheduler's, and the constructor sets the first rate from them: they
    # must be this phase's before it runs.
    set_group_rates(optimizer, schedule["max_lr"], schedule["min_lr"])
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0, override_opt_param_scheduler=True,
        use_checkpoint_opt_param_scheduler=False,
        **{k: v for k, v in schedule.items()})


def set_group_rates(optimizer, max_lr: float, min_lr: float) -> None:
    for group in optimizer.param_groups:
        group["max_lr"], group["min_lr"] = max_lr, min_lr


def restore_scheduler(scheduler, saved: dict, schedule: dict, use_checkpoint: bool) -> list:
    """Continue ``scheduler`` at the checkpoint's step. Returns lines describing what changed
    between the checkpoint's schedule and this run's (empty when nothing did)."""
    changes = [(key, saved.get(key), schedule[key]) for key in SCHEDULE_FIELDS
               if key in saved and saved.get(key) != schedule[key]
               and not (key == "wd_incr_steps" and schedule["wd_incr_style"] == "constant")]
    if use_checkpoint:
        scheduler.override_opt_param_scheduler = False
        scheduler.use_checkpoint_opt_param_scheduler = True
    scheduler.load_state_dict(saved)  # also steps to the checkpoint's num_steps
    if use_checkpoint:
        set_group_rates(scheduler.optimizer, scheduler.max_lr, scheduler.min_lr)
        scheduler.step(0)
    if not changes:
        return []
    which = "the checkpoint's (--use-checkpoint-schedule)" if use_checkpoint else \
        "this run's (pass --use-checkpoint-schedule to keep the checkpoint's)"
    diffs = ", ".join(f"{SCHEDULE_FIELDS[k]} {_v(old)} (checkpoint) vs {_v(new)} (this run)"
                      for k, old, new in changes)
    return [f"the LR schedule differs from the checkpoint's: {diffs}; using {which}; "
            f"step {saved.get('num_steps')} continues at lr {scheduler.optimizer.param_groups[0]['lr']:.4g}"]


def _v(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)
