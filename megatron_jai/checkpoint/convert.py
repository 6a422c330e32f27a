"""Hugging Face (Phi-3, Mixtral, JAI) -> Megatron-Core distributed checkpoint conversion, streaming,
and what both directions share (reading an HF directory, layout checks, atomic outputs).

``hf_to_mcore`` reads the safetensors files tensor by tensor (``safe_open`` maps the file and reads
only the tensor asked for) and writes each tensor, or each layer of a stacked tensor, as soon as it
is converted (:class:`~megatron_jai.checkpoint.stream.CheckpointWriter`). The tensor layouts are the
table of :mod:`megatron_jai.checkpoint.formats`.

The Megatron checkpoint is layout-free (global shapes): TP/PP given at conversion are only checked
against the architecture; any valid TP/PP loads it. The original HF ``config.json`` and
``generation_config.json`` are kept in ``M/hf/`` and its tokenizer files in ``M/tokenizer/`` (which
up-scaling and training carry along), so that the way back (:mod:`megatron_jai.hf.export`)
reproduces them.
"""
from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import time
import uuid
from dataclasses import dataclass
from typing import Iterator, Optional

import torch

from megatron_jai.checkpoint.dist import TOKENIZER_SUBDIR, tokenizer_files
from megatron_jai.checkpoint.formats import (ConversionError, hf_name_index, model_config_from_hf,
                                             tensor_map)
from megatron_jai.checkpoint.stream import HF_SUBDIR, CheckpointWriter
from megatron_jai.config import ModelConfig

HF_CONFIG = "config.json"
GENERATION_CONFIG = "generation_config.json"
SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
# Buffers some HF checkpoints carry that are recomputed, never converted.
IGNORED_HF_SUFFIXES = ("rotary_emb.inv_freq",)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class ConversionSummary:
    direction: str
    output: str
    tensors: int
    bytes: int
    seconds: float
    peak_rss_bytes: int
    notes: tuple = ()  # things the user should know that are not errors

    def line(self) -> str:
        return (f"{self.direction}: {self.tensors} tensors, {self.bytes / 2**20:.1f} MiB, "
                f"{self.seconds:.1f} s, peak RSS {self.peak_rss_bytes / 2**20:.0f} MiB -> {self.output}")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def validate_layout(cfg: ModelConfig, tp: int, pp: int, ep: int = 1,
                    first_stage_layers: Optional[int] = None,
                    last_stage_layers: Optional[int] = None) -> None:
    """TP must divide the heads and KV heads (and the padded vocabulary), PP the layers (or fit
    the uneven split), EP the experts (MoE models only)."""
    if tp < 1 or pp < 1 or ep < 1:
        raise ConversionError(f"TP, PP and EP must be >= 1 (got TP={tp}, PP={pp}, EP={ep})")
    if ep > 1 and not cfg.is_moe:
        raise ConversionError(f"expert parallelism (EP={ep}) needs an MoE model; this one is dense")
    try:
        cfg.check_layout(tp=tp, pp=pp, ep=ep, first_stage_layers=first_stage_layers,
                         last_stage_layers=last_stage_layers)
    except ValueError as e:
        raise ConversionError(str(e)) from None


def check_output(out: str, force: bool) -> None:
    if os.path.exists(out) and not force:
        raise ConversionError(f"output {out} already exists (use --force to replace it)")


@contextlib.contextmanager
def atomic_directory(out: str, force: bool) -> Iterator[str]:
    """A temporary sibling of ``out`` that replaces ``out`` when the block succeeds; removed when
    it fails, leaving ``out`` as it was."""
    out = os.path.abspath(out)
    check_output(out, force)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = os.path.join(os.path.dirname(out), f".{os.path.basename(out)}.tmp-{uuid.uuid4().hex[:8]}")
    os.makedirs(tmp)
    try:
        yield tmp
        old = None
        if os.path.exists(out):
            old = tmp + ".old"
            os.replace(out, old)
        os.replace(tmp, out)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def progress_bar(total: int, desc: str, enabled: bool, unit: str = "tensor"):
    from megatron_jai.cli import progress

    return progress(total=total, desc=desc, unit=unit, enabled=enabled)


# ---- HF -> Megatron ----------------------------------------------------------------------------
def read_hf_config(hf_dir: str) -> dict:
    path = os.path.join(hf_dir, HF_CONFIG)
    if not os.path.isdir(hf_dir):
        raise ConversionError(f"Hugging Face directory {hf_dir} does not exist")
    if not os.path.isfile(path):
        raise ConversionError(f"{hf_dir} has no {HF_CONFIG}")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path} is not valid JSON: {e}") from None


def safetensors_tensor_files(hf_dir: str) -> dict[str, str]:
    """HF tensor name -> safetensors file path, from the index or the single ``model.safetensors``;
    every file is opened to check it is complete."""
    from safetensors import SafetensorError, safe_open

    index_path = os.path.join(hf_dir, SAFETENSORS_INDEX)
    if os.path.isfile(index_path):
        with open(index_path) as f:
            weight_map = json.load(f).get("weight_map") or {}
        files = sorted(set(weight_map.values()))
    elif os.path.isfile(os.path.join(hf_dir, SAFETENSORS_SINGLE)):
        weight_map, files = None, [SAFETENSORS_SINGLE]
    else:
        raise ConversionError(f"{hf_dir} has neither {SAFETENSORS_INDEX} nor {SAFETENSORS_SINGLE}")
    located = {}
    for name in files:
        path = os.path.join(hf_dir, name)
        if not os.path.isfile(path):
            raise ConversionError(f"safetensors file {path} is missing")
        try:
            with safe_open(path, framework="pt") as f:
                keys = list(f.keys())
        except (SafetensorError, OSError) as e:
            raise ConversionError(f"safetensors file {path} is truncated or corrupt ({e})") from None
        for key in keys:
            located[key] = path
    if weight_map is not None:
        lost = sorted(k for k, v in weight_map.items() if located.get(k) != os.path.join(hf_dir, v))
        if lost:
            raise ConversionError(f"{len(lost)} tensors of {SAFETENSORS_INDEX} are not in the file it "
                                  f"names, e.g. {lost[0]}")
    return located


def hf_to_mcore(hf_dir: str, out: str, tp: int = 1, pp: int = 1, force: bool = False,
                name: Optional[str] = None, dtype: Optional[torch.dtype] = None,
                progress: bool = True, ep: int = 1) -> ConversionSummary:
    """Convert an HF Phi-3 directory to a Megatron-Core checkpoint root ``out`` (iteration 0)."""
    from safetensors import safe_open

    start = time.time()
    out = os.path.abspath(out)
    check_output(out, force)
    hf_config = read_hf_config(hf_dir)
    cfg = model_config_from_hf(hf_config, name=name or os.path.basename(os.path.abspath(hf_dir)))
    validate_layout(cfg, tp, pp, ep)
    notes = []
    window = hf_config.get("sliding_window")
    if window and window < cfg.max_position_embeddings - 1:
        notes.append(f"config.json has sliding_window={window}; the Megatron model attends over the "
                     f"whole context, so outputs agree for sequences up to {window} tokens")
    located = safetensors_tensor_files(hf_dir)
    rows = tensor_map(cfg, hf_config["model_type"])
    expected = hf_name_index(cfg, rows)
    present = {k for k in located if not k.endswith(IGNORED_HF_SUFFIXES)}
    missing, unexpected = sorted(set(expected) - present), sorted(present - set(expected))
    if missing:
        raise ConversionError(f"{len(missing)} tensors missing from the safetensors files, "
                              f"e.g. {missing[0]}")
    if unexpected:
        raise ConversionError(f"{len(unexpected)} tensors a {hf_config['model_type']} model with "
                              f"this config does not have, e.g. {unexpected[0]}")

    by_file: dict[str, list[str]] = {}
    for hf_name in expected:
        by_file.setdefault(located[hf_name], []).append(hf_name)
    pending: dict[tuple, dict] = {}  # (mcore key, layer) -> {position: tensor} until complete
    n_out = 0
    with CheckpointWriter(out, cfg, iteration=0, force=force) as writer:
        for fname in (HF_CONFIG, GENERATION_CONFIG):
            if os.path.isfile(os.path.join(hf_dir, fname)):
                shutil.copyfile(os.path.join(hf_dir, fname), writer.path(os.path.join(HF_SUBDIR, fname)))
        for fname, src in tokenizer_files(hf_dir).items():
            shutil.copyfile(src, writer.path(os.path.join(TOKENIZER_SUBDIR, fname)))
        with progress_bar(len(expected), "hf-to-mcore", progress) as bar:
            for path in sorted(by_file):
                with safe_open(path, framework="pt") as f:
                    for hf_name in by_file[path]:
                        row, layer, pos = expected[hf_name]
                        parts = pending.setdefault((row.mcore, layer), {})
                        parts[pos] = f.get_tensor(hf_name)
                        bar.update(1)
                        if len(parts) < len(row.hf):
                            continue
                        del pending[(row.mcore, layer)]
                        tensor = row.to_mcore(cfg, *[parts[i] for i in range(len(row.hf))])
                        del parts
                        if dtype is not None:
                            tensor = tensor.to(dtype)
                        if row.per_layer:
                            writer.write_layer(row.mcore, layer, cfg.num_layers, tensor)
                        else:
                            writer.write(row.mcore, tensor)
                        n_out += 1
                        del tensor
        assert not pending, f"incomplete tensors: {sorted(pending)[:3]}"
        nbytes = writer.bytes_written
    return ConversionSummary("hf-to-mcore", out, n_out, nbytes, time.time() - start, peak_rss_bytes(),
                             tuple(notes))
