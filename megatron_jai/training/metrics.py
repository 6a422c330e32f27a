"""Per-step training metrics: stdout, TensorBoard and a JSON-lines file (``--metrics-file``).

One record per step (rank 0 writes)::

    {"step": 12, "phase": "english-recovery", "loss": 5.91, "lr": 0.0029, "grad_norm": 0.83,
     "tokens_per_s": 5120.4, "tflops_per_gpu": 0.0012, "mfu": null, "skipped": false,
     "skipped_total": 0, "seq_length": 128, "global_batch_size": 16, "consumed_tokens": 24576,
     "loss/english": 5.88, "loss/thai": 5.97, "moe/entropy": 1.38, ...}

The first record a resumed run writes also holds ``"resumed_from": N`` (the checkpoint's
iteration; the file was cut back to it), so plots can mark resume points while every line stays a
step record. ``tools/plot_training.py`` draws curves from this file.
"""
from __future__ import annotations

import json
import math
import os
from typing import Optional

# Dense bf16 peak of one H100 SXM (TFLOP/s), the default MFU reference on GPU.
H100_BF16_PEAK_TFLOPS = 989.0


def throughput(tokens: int, seconds: float, flops_per_token: float, world_size: int,
               peak_tflops: Optional[float]) -> dict:
    """tokens/s, model TFLOP/s per GPU (``ModelConfig.flops_per_token``) and MFU for one step."""
    seconds = max(seconds, 1e-9)
    tflops = flops_per_token * tokens / seconds / world_size / 1e12
    return {
        "tokens_per_s": tokens / seconds,
        "tflops_per_gpu": tflops,
        "mfu": tflops / peak_tflops if peak_tflops else None,
    }


def _truncate_jsonl(path: str, last_step: int) -> None:
    """Drop records after ``last_step`` (steps a killed run logged past its last checkpoint)."""
    if not os.path.isfile(path):
        return
    kept = []
    with open(path) as f:
        for line in f:
            try:
                if json.loads(line).get("step", 0) <= last_step:
                    kept.append(line)
            except ValueError:
                continue  # a line cut short by a kill
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.writelines(kept)
    os.replace(tmp, path)


class MetricsLogger:
    """Writes step records on rank 0; other ranks get a logger that does nothing."""

    def __init__(self, enabled: bool, log_interval: int = 1, metrics_file: Optional[str] = None,
                 tensorboard_dir: Optional[str] = None, resume_step: int = 0):
        self.enabled = enabled
        self.log_interval = max(1, log_interval)
        self._resumed_from = resume_step or None  # marks the next record
        self._file = None
        self._tb = None
        if not enabled:
            return
        if metrics_file:
            os.makedirs(os.path.dirname(os.path.abspath(metrics_file)), exist_ok=True)
            if resume_step:
                _truncate_jsonl(metrics_file, resume_step)
            elif os.path.exists(metrics_file):
                os.remove(metrics_file)  # a fresh run starts a fresh file
            self._file = open(metrics_file, "a", buffering=1)
        if tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=tensorboard_dir, purge_step=resume_step + 1)

    def log(self, record: dict, print_line: bool = True) -> None:
        if not self.enabled:
            return
        step = record["step"]
        if self._resumed_from is not None:
            record = {**record, "resumed_from": self._resumed_from}
            self._resumed_from = None
        if self._file is not None:
            self._file.write(json.dumps(_jsonable(record)) + "\n")
        if self._tb is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) \
                        and key not in ("step", "resumed_from") and math.isfinite(value):
                    self._tb.add_scalar(key if "/" in key else f"train/{key}", value, step)
        if print_line and (step % self.log_interval == 0 or step == 1 or record.get("skipped")):
            print(format_record(record), flush=True)

    def text(self, message: str) -> None:
        if self.enabled:
            print(message, flush=True)
            if self._tb is not None:
                self._tb.add_text("events", message)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _jsonable(record: dict) -> dict:
    out = {}
    for key, value in record.items():
        if isinstance(value, float) and not math.isfinite(value):
            value = str(value)  # JSON has no NaN/Inf
        out[key] = value
    return out


def _fmt(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def format_record(r: dict) -> str:
    parts = [f"step {r['step']:>6d}", f"[{r.get('phase', '')}]", f"loss {_fmt(r.get('loss'), '.4f')}",
             f"lr {_fmt(r.get('lr'), '.3e')}", f"grad_norm {_fmt(r.get('grad_norm'), '.3f')}",
             f"tokens/s {_fmt(r.get('tokens_per_s'), '.0f')}",
             f"TFLOP/s/GPU {_fmt(r.get('tflops_per_gpu'), '.4f')}"]
    if "accuracy" in r:  # DPO
        parts.append(f"margin {_fmt(r.get('margin'), '.4f')} accuracy {_fmt(r['accuracy'], '.3f')}")
    if r.get("valid_loss") is not None:  # eval mode: inference skip alphas
        parts.append(f"valid loss {r['valid_loss']:.4f}"
                     + (f" (train alphas {r['valid_loss_train_alphas']:.4f})"
                        if r.get("valid_loss_train_alphas") is not None else "")
                     + (f" accuracy {r['valid_accuracy']:.3f}" if "valid_accuracy" in r else ""))
    if r.get("mfu") is not None:
        parts.append(f"MFU {100 * r['mfu']:.1f}%")
    per_dataset = [f"{k[5:]} {v:.3f}" for k, v in r.items() if k.startswith("loss/")]
    if per_dataset:
        parts.append("(" + ", ".join(per_dataset) + ")")
    if "moe/max_load" in r:  # MoE: busiest expert vs the mean, routing entropy (nats), drops
        parts.append(f"router load max {_fmt(r['moe/max_load'], '.2f')}x entropy "
                     f"{_fmt(r.get('moe/entropy'), '.3f')} dropped "
                     f"{_fmt(100 * r.get('moe/dropped_fraction', 0.0), '.1f')}%")
    if r.get("skipped"):
        parts.append(f"SKIPPED non-finite step (total {r.get('skipped_total')})")
    return " | ".join(parts)
