"""Hugging Face (Phi-3, Mixtral, JAI) <-> Megatron-Core distributed checkpoint conversion, streaming.

``hf_to_mcore`` reads the safetensors files tensor by tensor (``safe_open`` maps the file and reads
only the tensor asked for) and writes each tensor, or each layer of a stacked tensor, as soon as it
is converted (:class:`~megatron_jai.checkpoint.stream.CheckpointWriter`). ``mcore_to_hf`` reads one
layer of one tensor at a time and holds at most one output safetensors shard. The tensor layouts are
the table of :mod:`megatron_jai.checkpoint.hf_phi3`.

The Megatron checkpoint is layout-free (global shapes): TP/PP given at conversion are only checked
against the architecture; any valid TP/PP loads it. The original HF ``config.json`` and
``generation_config.json`` are kept in ``M/hf/`` and its tokenizer files in ``M/tokenizer/`` (which
up-scaling and training carry along), so that the way back reproduces them.

An export picks its Hugging Face architecture with
:func:`~megatron_jai.checkpoint.hf_phi3.hf_layout`: Phi-3 or Mixtral when they express the model,
else the JAI layout with its modeling code (:mod:`megatron_jai.hf`). Every export carries a
tokenizer, its special-token ids and a generation config (:mod:`megatron_jai.hf.tokenizer`).
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

from megatron_jai.checkpoint.hf_phi3 import (
    JAI_MODEL_TYPE,
    ConversionError,
    hf_config_for_layout,
    hf_layout,
    hf_name_index,
    model_config_from_hf,
    tensor_map,
)
from megatron_jai.checkpoint.dist import TOKENIZER_SUBDIR, tokenizer_files
from megatron_jai.checkpoint.stream import CheckpointReader, CheckpointWriter
from megatron_jai.config import ModelConfig

HF_SUBDIR = "hf"  # inside a Megatron checkpoint root: the HF files the way back needs
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


def parse_size(text: str) -> int:
    """``"5GB"``, ``"500MB"``, ``"2GiB"``, ``"1000"`` -> bytes."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    s = text.strip().upper()
    num = s.rstrip("KMGTIB")
    try:
        value = int(float(num) * units[s[len(num):]])
    except (KeyError, ValueError):
        raise ConversionError(f"cannot parse size {text!r} (e.g. 5GB, 500MB, 2GiB)") from None
    if value <= 0:
        raise ConversionError(f"size must be positive, got {text!r}")
    return value


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


def _check_output(out: str, force: bool) -> None:
    if os.path.exists(out) and not force:
        raise ConversionError(f"output {out} already exists (use --force to replace it)")


@contextlib.contextmanager
def atomic_directory(out: str, force: bool) -> Iterator[str]:
    """A temporary sibling of ``out`` that replaces ``out`` when the block succeeds; removed when
    it fails, leaving ``out`` as it was."""
    out = os.path.abspath(out)
    _check_output(out, force)
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


def _progress(total: int, desc: str, enabled: bool, unit: str = "tensor"):
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
    _check_output(out, force)
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
        with _progress(len(expected), "hf-to-mcore", progress) as bar:
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


# ---- Megatron -> HF ----------------------------------------------------------------------------
class _ShardedSafetensorsWriter:
    """Accumulates tensors up to ``max_shard_bytes`` per file; names them HF-style at the end."""

    def __init__(self, directory: str, max_shard_bytes: int):
        self.directory, self.max_shard_bytes = directory, max_shard_bytes
        self.buffer: dict[str, torch.Tensor] = {}
        self.buffer_bytes = 0
        self.shards: list[list[str]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.buffer and self.buffer_bytes + size > self.max_shard_bytes:
            self._flush()
        self.buffer[name] = tensor.contiguous()
        self.buffer_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        from safetensors.torch import save_file

        save_file(self.buffer, os.path.join(self.directory, f"shard-{len(self.shards)}.tmp"),
                  metadata={"format": "pt"})
        self.shards.append(list(self.buffer))
        self.buffer, self.buffer_bytes = {}, 0

    def close(self) -> None:
        if self.buffer or not self.shards:
            self._flush()
        n = len(self.shards)
        if n == 1:
            os.replace(os.path.join(self.directory, "shard-0.tmp"),
                       os.path.join(self.directory, SAFETENSORS_SINGLE))
            return
        weight_map = {}
        for i, names in enumerate(self.shards):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(os.path.join(self.directory, f"shard-{i}.tmp"), os.path.join(self.directory, final))
            weight_map.update({name: final for name in names})
        with open(os.path.join(self.directory, SAFETENSORS_INDEX), "w") as f:
            json.dump({"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}, f,
                      indent=2, sort_keys=True)
            f.write("\n")


def _hf_order(cfg: ModelConfig, rows) -> Iterator[tuple]:
    """``(row, layer)`` in Hugging Face order: embeddings, layer by layer, final norm, head."""
    first_layer_row = next(i for i, r in enumerate(rows) if r.per_layer)
    for row in rows[:first_layer_row]:
        yield row, None
    for layer in range(cfg.num_layers):
        for row in rows:
            if row.per_layer:
                yield row, layer
    for row in rows[first_layer_row:]:
        if not row.per_layer:
            yield row, None


def mcore_to_hf(mcore_dir: str, out: str, force: bool = False, max_shard_size: str = "5GB",
                dtype: Optional[torch.dtype] = None, progress: bool = True,
                tokenizer: Optional[str] = None, hf_format: str = "auto") -> ConversionSummary:
    """Convert a Megatron-Core checkpoint (root or iteration directory) to a Hugging Face directory
    (Phi-3, Mixtral or JAI: :func:`~megatron_jai.checkpoint.hf_phi3.hf_layout`; ``hf_format="jai"``
    forces the JAI layout) with its tokenizer (``tokenizer``, else the checkpoint's own)."""
    from megatron_jai.hf import MODEL_CODE_FILES, model_code_path
    from megatron_jai.hf.tokenizer import export_tokenizer, find_tokenizer

    start = time.time()
    out = os.path.abspath(out)
    _check_output(out, force)
    max_shard_bytes = parse_size(max_shard_size)
    reader = CheckpointReader(mcore_dir)
    cfg = reader.config
    layout = hf_layout(cfg, hf_format)
    tokenizer_src = find_tokenizer(reader.root, tokenizer)
    hf_side = os.path.join(reader.root, HF_SUBDIR)
    base = None
    if os.path.isfile(os.path.join(hf_side, HF_CONFIG)):
        with open(os.path.join(hf_side, HF_CONFIG)) as f:
            base = json.load(f)
    hf_config = hf_config_for_layout(cfg, layout, base)
    rows = tensor_map(cfg, layout)
    for row in rows:
        if row.mcore not in reader:
            raise ConversionError(f"checkpoint {reader.iter_dir} has no tensor {row.mcore}")
        if row.per_layer and reader.shape(row.mcore)[0] != cfg.num_layers:
            raise ConversionError(f"{row.mcore} has {reader.shape(row.mcore)[0]} layers, the config "
                                  f"{cfg.num_layers}")
    # The config's dtype names the tensors written (transformers loads them as that dtype): the
    # cast, else what the checkpoint holds (e.g. fp32 after `hf-to-mcore --dtype fp32` of a bf16
    # model, or bf16 weights of a GPU training run).
    stored = str(dtype if dtype is not None else reader.dtype(rows[0].mcore)).replace("torch.", "")
    key = "torch_dtype" if "torch_dtype" in hf_config and "dtype" not in hf_config else "dtype"
    if (key in hf_config or base is None) and hf_config.get(key) != stored:
        hf_config[key] = stored
    order = list(_hf_order(cfg, rows))
    n_tensors = sum(len(row.hf) for row, _ in order)
    notes = []
    if cfg.moe_capacity_factor is not None:
        notes.append(f"the model was trained with expert capacity factor {cfg.moe_capacity_factor}; "
                     f"the exported model routes every token (dropless)")
    with atomic_directory(out, force) as tmp:
        tok = export_tokenizer(tokenizer_src, tmp, cfg.vocab_size, cfg.max_position_embeddings)
        notes += tok.notes
        # Token ids: the original HF config's when there is one (a round trip reproduces it), else
        # the tokenizer's (a config made from scratch: up-scaled or trained models).
        for key, value in tok.token_ids().items():
            if base is None:
                hf_config[key] = value
            elif key in base and base[key] != value:
                notes.append(f"{key} {base[key]} of the original config.json kept; the tokenizer "
                             f"says {value}")
        shards = _ShardedSafetensorsWriter(tmp, max_shard_bytes)
        with _progress(n_tensors, "mcore-to-hf", progress) as bar:
            for row, layer in order:
                tensor = reader.read_layer(row.mcore, layer) if row.per_layer else reader.read(row.mcore)
                if dtype is not None:
                    tensor = tensor.to(dtype)
                converted = row.to_hf(cfg, tensor)
                if not isinstance(converted, tuple):
                    converted = (converted,)
                for hf_name, t in zip(row.hf_names(layer), converted):
                    shards.add(hf_name, t)
                    bar.update(1)
                del tensor, converted
        shards.close()
        _write_json_or_copy(hf_config, base, os.path.join(hf_side, HF_CONFIG), os.path.join(tmp, HF_CONFIG))
        generation = os.path.join(hf_side, GENERATION_CONFIG)
        if os.path.isfile(generation):  # the original model's, unchanged
            shutil.copyfile(generation, os.path.join(tmp, GENERATION_CONFIG))
        else:
            _write_json_or_copy(tok.generation_config(), None, None, os.path.join(tmp, GENERATION_CONFIG))
        if layout == JAI_MODEL_TYPE:
            for name in MODEL_CODE_FILES:
                shutil.copyfile(model_code_path(name), os.path.join(tmp, name))
        nbytes = shards.total_bytes
    return ConversionSummary(f"mcore-to-hf ({layout})", out, n_tensors, nbytes, time.time() - start,
                             peak_rss_bytes(), tuple(notes))


def _write_json_or_copy(obj: dict, original: Optional[dict], original_path: Optional[str],
                        path: str) -> None:
    """``original_path`` byte for byte when ``obj`` equals its content, else ``obj`` as JSON."""
    if original is not None and obj == original:
        shutil.copyfile(original_path, path)
        return
    with open(path, "w") as f:
        f.write(json.dumps(obj, indent=2, sort_keys=True) + "\n")  # as transformers does
