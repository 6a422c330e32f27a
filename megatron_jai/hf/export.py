"""Megatron-Core distributed checkpoint -> Hugging Face directory, streaming (``mcore_to_hf``).

Reads one layer of one tensor at a time and holds at most one output safetensors shard. The export
picks its Hugging Face format with :func:`~megatron_jai.checkpoint.formats.hf_layout`: Phi-3 or
Mixtral when they express the model, else the JAI format with its modeling code (copied from this
package: :data:`megatron_jai.hf.MODEL_CODE_FILES`). Every export carries a tokenizer, its
special-token ids and a generation config (:mod:`megatron_jai.hf.tokenizer`). The original HF
``config.json`` and ``generation_config.json`` a conversion kept in ``M/hf/`` are reproduced byte
for byte when the model is unchanged.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from typing import Iterator, Optional

import torch

from megatron_jai.checkpoint.convert import (GENERATION_CONFIG, HF_CONFIG, SAFETENSORS_INDEX,
                                             SAFETENSORS_SINGLE, ConversionSummary,
                                             atomic_directory, check_output, peak_rss_bytes,
                                             progress_bar)
from megatron_jai.checkpoint.formats import (ConversionError, hf_config_for_layout, hf_layout,
                                             jai, tensor_map)
from megatron_jai.checkpoint.stream import HF_SUBDIR, CheckpointReader
from megatron_jai.config import ModelConfig
from megatron_jai.hf import MODEL_CODE_FILES, model_code_path
from megatron_jai.hf.tokenizer import export_tokenizer, find_tokenizer


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
    (Phi-3, Mixtral or JAI: :func:`~megatron_jai.checkpoint.formats.hf_layout`; ``hf_format="jai"``
    forces the JAI layout) with its tokenizer (``tokenizer``, else the checkpoint's own)."""
    start = time.time()
    out = os.path.abspath(out)
    check_output(out, force)
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
        with progress_bar(n_tensors, "mcore-to-hf", progress) as bar:
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
        if layout == jai.MODEL_TYPE:
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
