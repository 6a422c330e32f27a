"""Loss and throughput curves from ``pretrain_jai.py --metrics-file`` JSON lines (one object per
step with at least ``step``, ``loss``, ``lr``, ``grad_norm``, ``tokens_per_s``; optional
``phase``, ``loss/<dataset>``, ``valid_loss``, ``tflops_per_gpu``, ``skipped``, ``moe/*`` router
statistics, ``resumed_from``).

Panels: training loss (per-dataset losses and validation loss when present, phase boundaries
marked, skipped steps crossed), throughput (tokens/s; TFLOP/s per GPU on a second axis when
present), learning rate with gradient norm, and for MoE runs the router (busiest expert's load vs
the mean, routing entropy, dropped fraction). Resume points are dashed vertical lines on every
panel.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

from megatron_jai.cli import UserError

REQUIRED_KEYS = ("step", "loss", "lr", "grad_norm", "tokens_per_s")


class MetricsError(UserError):
    """An unreadable or empty metrics file (one-line message, meant for the user)."""


ROUTER_KEYS = ("moe/max_load", "moe/entropy", "moe/dropped_fraction")


@dataclass
class Run:
    path: str
    records: List[dict]
    skipped_lines: int = 0
    label: str = ""
    resumes: List[int] = field(default_factory=list)  # steps a resumed run continued from

    def series(self, key: str):
        """(steps, values) where the record has a finite number under ``key``."""
        xs, ys = [], []
        for r in self.records:
            v = r.get(key)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                xs.append(r["step"])
                ys.append(v)
        return xs, ys

    def keys_with_prefix(self, prefix: str) -> List[str]:
        keys = []
        for r in self.records:
            keys.extend(k for k in r if k.startswith(prefix) and k not in keys)
        return keys

    def phase_starts(self) -> List[tuple]:
        """(step, phase name) where the ``phase`` field changes."""
        starts, current = [], object()
        for r in self.records:
            if "phase" in r and r["phase"] != current:
                current = r["phase"]
                starts.append((r["step"], str(current)))
        return starts


def read_metrics(path: str) -> Run:
    """Parse a metrics file. Lines that are not JSON objects (e.g. cut short by a kill) are
    skipped and counted. Records of the same step are merged (a later value wins); a step lower
    than the last one (a run resumed from an earlier checkpoint into an uncut file) starts a new
    line of descent: the records it replaces are dropped and the resume point is marked, as it is
    for records with ``resumed_from``. Records without a ``loss`` are ignored (e.g.
    evaluation-only lines)."""
    if not os.path.isfile(path):
        raise MetricsError(f"metrics file {path!r} does not exist")
    by_step: Dict[int, dict] = {}
    resumes: List[int] = []
    skipped = 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                skipped += 1
                continue
            if not isinstance(rec, dict) or not isinstance(rec.get("step"), int):
                skipped += 1
                continue
            step = rec["step"]
            if by_step and step < max(by_step):  # rolled back: the newest line of descent wins
                for old in [s for s in by_step if s >= step]:
                    del by_step[old]
                resumes = [r for r in resumes if r < step]
                resumes.append(rec.get("resumed_from", step - 1))
            elif isinstance(rec.get("resumed_from"), int):
                resumes.append(rec["resumed_from"])
            by_step.setdefault(step, {}).update(rec)
    records = [by_step[s] for s in sorted(by_step) if "loss" in by_step[s]]
    if not records:
        raise MetricsError(f"{path}: no step records with a loss ({skipped} unreadable lines)")
    missing = [k for k in REQUIRED_KEYS if not any(k in r for r in records)]
    if missing:
        raise MetricsError(f"{path}: no {', '.join(missing)} in any record (is this a "
                           f"pretrain_jai.py --metrics-file?)")
    run = Run(path=path, records=records, skipped_lines=skipped,
              label=os.path.splitext(os.path.basename(path))[0], resumes=sorted(set(resumes)))
    if not run.series("loss")[0]:  # e.g. every step skipped with a NaN loss: nothing to draw
        raise MetricsError(f"{path}: no finite loss in {len(records)} step records")
    return run


def plot_runs(runs: Sequence[Run], out_path: str, title: Optional[str] = None,
              smooth: int = 1) -> List[str]:
    """Draw the panels for one or more runs into ``out_path`` (PNG; written atomically).
    Returns the panels' names (``loss``, ``throughput``, ``lr``, and ``router`` for MoE runs)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def smoothed(ys):
        if smooth <= 1:
            return ys
        out, acc = [], []
        for y in ys:
            acc.append(y)
            if len(acc) > smooth:
                acc.pop(0)
            out.append(sum(acc) / len(acc))
        return out

    panels = ["loss", "throughput", "lr"]
    if any(run.series(key)[0] for run in runs for key in ROUTER_KEYS):
        panels.append("router")
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, 3.7 * len(panels)), sharex=True)
    ax_loss, ax_tput, ax_lr = axes[:3]
    multi = len(runs) > 1
    for i, run in enumerate(runs):
        color = f"C{i}"
        prefix = f"{run.label}: " if multi else ""
        xs, ys = run.series("loss")
        ax_loss.plot(xs, smoothed(ys), color=color, lw=1.6, label=f"{prefix}loss")
        for j, key in enumerate(k for k in run.keys_with_prefix("loss/")):
            kx, ky = run.series(key)
            ax_loss.plot(kx, smoothed(ky), lw=0.9, ls=["--", ":", "-."][j % 3], color=color,
                         alpha=0.8, label=f"{prefix}{key}")
        vx, vy = run.series("valid_loss")
        if vx:
            ax_loss.plot(vx, vy, "o-", color=color, ms=4, lw=1, alpha=0.7,
                         label=f"{prefix}valid_loss")
        skipped = [r["step"] for r in run.records if r.get("skipped") is True]
        if skipped:
            ax_loss.plot(skipped, [ax_loss.get_ylim()[0]] * len(skipped), "x", color="red",
                         label=f"{prefix}skipped steps ({len(skipped)})")
        starts = run.phase_starts() if not multi else []
        for k, (step, name) in enumerate(starts if len(starts) > 1 else []):
            if k:
                for ax in axes:
                    ax.axvline(step, color="grey", ls=":", lw=1)
            ax_loss.annotate(f"phase {name}", (step, 0.98), xycoords=("data", "axes fraction"),
                             xytext=(3, 0), textcoords="offset points", va="top", ha="left",
                             fontsize=8, color="grey")
        for k, step in enumerate(run.resumes):
            for ax in axes:
                ax.axvline(step, color=color, ls="--", lw=0.8, alpha=0.6,
                           label=f"{prefix}resumed" if ax is ax_loss and not k else None)
        if "router" in panels:
            _plot_router(axes[3], run, color, prefix, smoothed)
        tx, ty = run.series("tokens_per_s")
        ax_tput.plot(tx, smoothed(ty), color=color, label=f"{prefix}tokens/s")
        fx, fy = run.series("tflops_per_gpu")
        if fx and not multi:
            twin = ax_tput.twinx()
            twin.plot(fx, smoothed(fy), color="C3", lw=0.8, alpha=0.7, label="TFLOP/s per GPU")
            twin.set_ylabel("TFLOP/s per GPU")
            twin.legend(loc="lower right", fontsize=8)
        lx, ly = run.series("lr")
        ax_lr.plot(lx, ly, color=color, label=f"{prefix}lr")
        gx, gy = run.series("grad_norm")
        if gx:
            twin_g = ax_lr.twinx()
            twin_g.plot(gx, gy, color=color, lw=0.7, alpha=0.5, ls="--",
                        label=f"{prefix}grad norm")
            if min(gy) > 0 and max(gy) / min(gy) > 50:  # one spike would flatten the rest
                twin_g.set_yscale("log")
            twin_g.set_ylabel("grad norm")
            twin_g.legend(loc="upper center", fontsize=8)
    ax_loss.set_ylabel("loss")
    ax_loss.legend(fontsize=8)
    ax_loss.grid(alpha=0.3)
    ax_tput.set_ylabel("tokens/s")
    ax_tput.legend(loc="lower left", fontsize=8)
    ax_tput.grid(alpha=0.3)
    ax_lr.set_ylabel("learning rate")
    ax_lr.legend(loc="upper right", fontsize=8)
    ax_lr.grid(alpha=0.3)
    axes[-1].set_xlabel("step")
    fig.suptitle(title or ", ".join(r.label for r in runs))
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    tmp = f"{out_path}.tmp{os.getpid()}.png"
    try:
        fig.savefig(tmp, dpi=110)
        os.replace(tmp, out_path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.remove(tmp)
    return panels


def _plot_router(ax, run: Run, color: str, prefix: str, smoothed) -> None:
    """Router panel: the busiest expert's load over the mean (1 = balanced) and the routing
    entropy on the left axis, the dropped fraction of routed slots on the right."""
    for key, style, label in (("moe/max_load", "-", "max load / mean"),
                              ("moe/entropy", "--", "entropy (nats)")):
        xs, ys = run.series(key)
        if xs:
            ax.plot(xs, smoothed(ys), color=color, ls=style, lw=1, label=f"{prefix}{label}")
    dx, dy = run.series("moe/dropped_fraction")
    if dx and any(dy):
        twin = ax.twinx()
        twin.plot(dx, smoothed(dy), color=color, ls=":", lw=0.8, alpha=0.7,
                  label=f"{prefix}dropped fraction")
        twin.set_ylabel("dropped fraction")
        twin.legend(loc="lower right", fontsize=8)
    ax.set_ylabel("router")
    ax.legend(loc="upper right", fontsize=8)
    ax.grid(alpha=0.3)


def summarize(run: Run) -> str:
    """One line: steps, first/last/min loss, mean tokens/s."""
    _, losses = run.series("loss")
    _, tput = run.series("tokens_per_s")
    steps = [r["step"] for r in run.records]
    mean_tput = sum(tput) / len(tput) if tput else float("nan")
    resumes = f", resumed at step {', '.join(map(str, run.resumes))}" if run.resumes else ""
    return (f"{run.label}: steps {steps[0]}-{steps[-1]} ({len(steps)} records), loss "
            f"{losses[0]:.3f} -> {losses[-1]:.3f} (min {min(losses):.3f}), "
            f"mean {mean_tput:,.0f} tokens/s{resumes}")
