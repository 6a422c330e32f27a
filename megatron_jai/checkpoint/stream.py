"""Streaming, single-process access to our Megatron-Core distributed checkpoints.

Checkpoint surgery tools (HF conversion, vocabulary surgery, depth up-scaling, MoE upcycling) need
to read and write checkpoints of models far larger than one machine's memory, without
torch.distributed and without building the model. This module reads and writes the torch_dist
format of :mod:`megatron_jai.checkpoint.dist` directly, one tensor chunk at a time: at most one
layer of one tensor is in memory.

The format (what ``dist_checkpointing.save`` writes with the ``torch_dist`` backend)::

    M/model_config.json, M/latest_checkpointed_iteration.txt   (see megatron_jai.checkpoint.dist)
    M/iter_0000000/.metadata        pickled torch.distributed.checkpoint ``Metadata``: per key the
                                    global shape/dtype and its chunks, and per chunk the file,
                                    byte offset and length where it is stored
    M/iter_0000000/__0_<n>.distcp   chunks, each a ``torch.save``-d tensor, back to back
    M/iter_0000000/common.pt        replicated (non-sharded) state, ``torch.save``-d dict
    M/iter_0000000/metadata.json    Megatron's backend description

Tensors are stored in their *global* shape; ``decoder.layers.*`` tensors are stacked with a leading
layer dimension ``[num_layers, ...]``. Megatron's ``ShardedObject`` entries (the TE/linear
``_extra_state``) are byte entries named ``<key>/shard_<offset>_<shape>``, each a ``torch.save``-d
list holding the object.

API (stable; other tools build on it)::

    r = CheckpointReader("M")            # checkpoint root (newest iteration) or an iter_* directory
    r.config                             # ModelConfig (the iteration's own, else model_config.json)
    r.iteration, r.iter_dir, r.common    # iteration number, its directory, common.pt contents
    r.keys()                             # tensor keys (model and anything else saved, e.g. optimizer)
    r.shape(k), r.dtype(k), r.num_bytes(k), r.is_stacked(k)
    r.read(k)                            # whole global tensor
    r.read_layer(k, i)                   # layer i of a stacked tensor (reads only that layer's chunks)
    r.read_region(k, offsets, sizes)     # any box of the global tensor (reads overlapping chunks)
    r.object_keys(), r.read_object(uk)   # ShardedObject entries (by unique key)

    with CheckpointWriter("M2", cfg, iteration=0, force=False) as w:
        w.write(k, tensor)                          # a whole tensor (one chunk)
        w.write_layer(k, i, num_layers, tensor)     # layer i of a stacked tensor (written at once)
        w.write_object(k, obj, layer=i, num_layers=L)  # a ShardedObject (rarely needed)
        w.path("hf_config.json")                    # a path inside the output, for extra files
    # leaving the block finalises (metadata, common.pt, model_config.json, tracker) and renames the
    # temporary directory to M2; an exception removes it and leaves M2 untouched.

The writer adds the ``_extra_state`` objects Megatron-Core's linear layers expect (``None``, as a
fresh model saves them) for every stacked ``...linear_*.weight``; ``extra_state=False`` turns that
off. ``finalize`` checks that every stacked tensor got all its layers.

Checkpoint surgery (vocabulary surgery, depth up-scaling, MoE upcycling, merging) has one shape,
:class:`Surgery`: open the reader(s), check the per-layer shapes, copy (or compute) the other model
keys, loop over the layers, copy the side files that travel with a checkpoint::

    s = Surgery(["A", "B"])              # readers, model keys, shapes checked against the config
    s.write("M", cfg, tensor=lambda key: ..., layer=lambda old: ((key, t), ...), layer_map=[...])
"""
from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import uuid
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import torch
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)

from megatron_jai.checkpoint import manifest
from megatron_jai.checkpoint.dist import (CONFIG_FILE, TOKENIZER_SUBDIR, TRACKER_FILE, iteration_dir,
                                          latest_iteration)
from megatron_jai import cli
from megatron_jai.cli import UserError
from megatron_jai.config import ModelConfig

try:  # private in torch; the dataclass DCP's FileSystemReader expects in storage_data
    from torch.distributed.checkpoint.filesystem import _StorageInfo
except ImportError as e:  # pragma: no cover - depends on the torch version
    raise ImportError(f"this torch version has no torch.distributed.checkpoint _StorageInfo: {e}")

METADATA_FILE = ".metadata"
COMMON_FILE = "common.pt"
STACKED_PREFIX = "decoder.layers."
EXTRA_STATE = "_extra_state"
# Checkpoint keys that belong to the model (optimizer states and the like are not carried over:
# surgery produces a fresh iteration-0 checkpoint).
MODEL_KEY_PREFIXES = ("embedding.", "decoder.", "output_layer.")
# Inside a checkpoint root, besides the iterations and TOKENIZER_SUBDIR: the converter's record of
# the original HF model (the way back reproduces it), and the DUS plan an up-scaled model came from.
HF_SUBDIR = "hf"
PLAN_FILE = "dus_plan.json"


# Megatron-Core's backend description (``dist_checkpointing.core.CheckpointingConfig``), written
# directly: importing megatron.core (~5 s) is most of a streaming tool's start-up otherwise.
MEGATRON_CONFIG_FILE = "metadata.json"
MEGATRON_CONFIG = {"sharded_backend": "torch_dist", "sharded_backend_version": 1,
                   "common_backend": "torch", "common_backend_version": 1}


class CheckpointFormatError(UserError):
    """The directory is not a (complete, readable) checkpoint of our format."""


def sharded_object_key(key: str, offsets: tuple, shape: tuple) -> str:
    """Unique key of a Megatron ``ShardedObject`` (as ``ShardedObject.unique_key`` builds it)."""
    return f"{key}/shard_{'.'.join(map(str, offsets))}_{'.'.join(map(str, shape))}"


def _owns_extra_state(key: str) -> bool:
    # Megatron's linear layers (local and TE) carry an _extra_state object; norms and routers do not.
    module, _, param = key.rpartition(".")
    return param == "weight" and module.rpartition(".")[2].startswith("linear_")


class _FileSlice(io.RawIOBase):
    """A read-only view of ``length`` bytes at ``offset`` of an open file (what torch.load reads)."""

    def __init__(self, f, offset: int, length: int):
        super().__init__()
        self._f, self._start, self._length, self._pos = f, offset, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._length}[whence]
        self._pos = max(0, base + pos)
        return self._pos

    def readinto(self, buffer) -> int:
        n = max(0, min(len(buffer), self._length - self._pos))
        if n == 0:
            return 0
        self._f.seek(self._start + self._pos)
        got = self._f.readinto(memoryview(buffer)[:n])
        self._pos += got
        return got


class CheckpointReader:
    """Read tensors of a checkpoint one at a time (see the module docstring)."""

    def __init__(self, path: str, iteration: Optional[int] = None, verify: bool = True):
        path = os.path.abspath(path)
        if os.path.isfile(os.path.join(path, METADATA_FILE)) or \
                (os.path.isdir(path) and manifest.ITER_DIR.match(os.path.basename(path))):
            self.iter_dir, self.root = path, os.path.dirname(path)
            name = os.path.basename(path)
            self.iteration = int(name[5:]) if name.startswith("iter_") and name[5:].isdigit() else None
        else:
            if not os.path.isdir(path):
                raise CheckpointFormatError(f"checkpoint directory {path} does not exist")
            if iteration is None:
                iteration = latest_iteration(path)
                if iteration is None:
                    raise CheckpointFormatError(
                        f"{path} is not a checkpoint (no {TRACKER_FILE} and no {METADATA_FILE})")
            self.root, self.iteration = path, iteration
            self.iter_dir = iteration_dir(path, iteration)
        if verify:  # before anything of it is read (checkpoint/manifest.py)
            manifest.verify_for_reading(self.iter_dir, manifest.path_hint)
        meta_path = os.path.join(self.iter_dir, METADATA_FILE)
        try:
            with open(meta_path, "rb") as f:
                self.metadata: Metadata = pickle.load(f)
        except (OSError, pickle.UnpicklingError, EOFError) as e:
            raise CheckpointFormatError(f"cannot read checkpoint metadata {meta_path}: {e}") from None
        self._tensors = {k: v for k, v in self.metadata.state_dict_metadata.items()
                         if isinstance(v, TensorStorageMetadata)}
        self._objects = [k for k, v in self.metadata.state_dict_metadata.items()
                         if isinstance(v, BytesStorageMetadata)]
        self._storage = self.metadata.storage_data
        self._config: Optional[ModelConfig] = None

    # ---- metadata -----------------------------------------------------------------------------
    @property
    def config(self) -> ModelConfig:
        if self._config is None:
            # A training checkpoint keeps each iteration's own config in its common state (RoPE
            # changes between phases); the root's model_config.json is only the newest one's.
            saved = self.common.get("model_config")
            if isinstance(saved, dict):
                self._config = ModelConfig.from_dict(saved)
                return self._config
            path = os.path.join(self.root, CONFIG_FILE)
            if not os.path.isfile(path):
                raise CheckpointFormatError(f"checkpoint {self.root} has no {CONFIG_FILE}")
            self._config = ModelConfig.load(path)
        return self._config

    @property
    def common(self) -> dict:
        path = os.path.join(self.iter_dir, COMMON_FILE)
        return torch.load(path, map_location="cpu", weights_only=False) if os.path.isfile(path) else {}

    def keys(self) -> list[str]:
        return list(self._tensors)

    def __contains__(self, key: str) -> bool:
        return key in self._tensors

    def _meta(self, key: str) -> TensorStorageMetadata:
        try:
            return self._tensors[key]
        except KeyError:
            raise KeyError(f"tensor {key!r} not in checkpoint {self.iter_dir}") from None

    def shape(self, key: str) -> torch.Size:
        return torch.Size(self._meta(key).size)

    def dtype(self, key: str) -> torch.dtype:
        return self._meta(key).properties.dtype

    def num_bytes(self, key: str) -> int:
        return self.shape(key).numel() * torch.empty((), dtype=self.dtype(key)).element_size()

    def is_stacked(self, key: str) -> bool:
        return key.startswith(STACKED_PREFIX) and key in self._tensors

    def object_keys(self) -> list[str]:
        return list(self._objects)

    # ---- data ---------------------------------------------------------------------------------
    def _load_chunk(self, key: str, chunk: ChunkStorageMetadata) -> torch.Tensor:
        info = self._storage[MetadataIndex(key, chunk.offsets)]
        if info.transform_descriptors:
            raise CheckpointFormatError(f"{key}: stream transforms {info.transform_descriptors} "
                                        f"are not supported")
        with open(os.path.join(self.iter_dir, info.relative_path), "rb") as f:
            if os.fstat(f.fileno()).st_size < info.offset + info.length:
                raise CheckpointFormatError(f"{key}: file {info.relative_path} is truncated")
            # torch.load reads the records straight from the file: no second copy in memory
            return torch.load(_FileSlice(f, info.offset, info.length), map_location="cpu",
                              weights_only=True)

    def read_region(self, key: str, start: tuple, size: tuple) -> torch.Tensor:
        """The box ``[start, start+size)`` of the global tensor, from every overlapping chunk."""
        meta = self._meta(key)
        start, size = tuple(start), tuple(size)
        for chunk in meta.chunks:  # the common case: the box is exactly one stored chunk
            if tuple(chunk.offsets) == start and tuple(chunk.sizes) == size:
                return self._load_chunk(key, chunk)
        out = torch.empty(size, dtype=meta.properties.dtype)
        covered = 0
        for chunk in meta.chunks:
            lo = [max(s, o) for s, o in zip(start, chunk.offsets)]
            hi = [min(s + n, o + c) for s, n, o, c in zip(start, size, chunk.offsets, chunk.sizes)]
            if any(a >= b for a, b in zip(lo, hi)):
                continue
            data = self._load_chunk(key, chunk)
            src, dst = data, out
            for dim, (a, b) in enumerate(zip(lo, hi)):
                src = src.narrow(dim, a - chunk.offsets[dim], b - a)
                dst = dst.narrow(dim, a - start[dim], b - a)
            dst.copy_(src)
            covered += src.numel()
            del data, src
        if covered != out.numel():
            raise CheckpointFormatError(f"{key}: chunks cover {covered} of {out.numel()} elements")
        return out

    def read(self, key: str) -> torch.Tensor:
        """The whole global tensor."""
        shape = tuple(self.shape(key))
        return self.read_region(key, (0,) * len(shape), shape)

    def read_layer(self, key: str, layer: int) -> torch.Tensor:
        """Layer ``layer`` of a stacked ``decoder.layers.*`` tensor (without the layer dimension)."""
        shape = tuple(self.shape(key))
        if not key.startswith(STACKED_PREFIX) or not shape:
            raise KeyError(f"{key!r} is not a stacked per-layer tensor")
        if not 0 <= layer < shape[0]:
            raise IndexError(f"{key}: layer {layer} out of range [0, {shape[0]})")
        return self.read_region(key, (layer,) + (0,) * (len(shape) - 1), (1,) + shape[1:])[0]

    def read_object(self, unique_key: str) -> Any:
        info = self._storage[MetadataIndex(unique_key)]
        with open(os.path.join(self.iter_dir, info.relative_path), "rb") as f:
            f.seek(info.offset)
            data = f.read(info.length)
        objs = torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
        return objs[0] if isinstance(objs, list) and len(objs) == 1 else objs

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        """``(key, tensor)`` for every tensor; stacked tensors whole (use read_layer to stream)."""
        for key in self.keys():
            yield key, self.read(key)


class CheckpointWriter:
    """Write a checkpoint one tensor (or one layer of one tensor) at a time.

    Everything goes into a temporary sibling directory that replaces ``root`` only when
    :meth:`finalize` succeeds; use it as a context manager so that errors leave nothing behind.
    """

    def __init__(self, root: str, cfg: ModelConfig, iteration: int = 0, force: bool = False,
                 extra_state: bool = True, max_file_bytes: int = 4 << 30):
        self.root = os.path.abspath(root)
        if os.path.exists(self.root) and not force:
            raise FileExistsError(f"output {self.root} already exists (use --force to replace it)")
        self.cfg, self.iteration, self.extra_state = cfg, iteration, extra_state
        self.max_file_bytes = max_file_bytes
        parent = os.path.dirname(self.root)
        os.makedirs(parent, exist_ok=True)
        self.tmp_root = os.path.join(parent, f".{os.path.basename(self.root)}.tmp-{uuid.uuid4().hex[:8]}")
        self.tmp_iter = iteration_dir(self.tmp_root, iteration)
        os.makedirs(self.tmp_iter)
        self._meta: dict[str, Any] = {}
        self._storage: dict[MetadataIndex, _StorageInfo] = {}
        self._layers_written: dict[str, set] = {}
        self._file = None
        self._file_index = -1
        self.bytes_written = 0
        self.tensors_written = 0
        self.finalized = False
        self._open_next_file()

    # ---- context manager ----------------------------------------------------------------------
    def __enter__(self) -> "CheckpointWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            if not self.finalized:
                self.finalize()
        else:
            self.abort()

    def abort(self) -> None:
        """Drop everything written so far."""
        if self._file is not None:
            self._file.close()
            self._file = None
        shutil.rmtree(self.tmp_root, ignore_errors=True)

    def path(self, relpath: str) -> str:
        """A path inside the output checkpoint root (for extra files such as an HF config)."""
        p = os.path.join(self.tmp_root, relpath)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        return p

    # ---- data ---------------------------------------------------------------------------------
    def _open_next_file(self) -> None:
        if self._file is not None:
            self._file.close()
        self._file_index += 1
        self._file_name = f"__0_{self._file_index}.distcp"
        self._file = open(os.path.join(self.tmp_iter, self._file_name), "wb")

    def _append(self, payload) -> _StorageInfo:
        if self._file.tell() >= self.max_file_bytes:
            self._open_next_file()
        start = self._file.tell()
        if isinstance(payload, torch.Tensor):
            torch.save(payload, self._file)
        else:
            self._file.write(payload)
        length = self._file.tell() - start
        self.bytes_written += length
        return _StorageInfo(self._file_name, start, length)

    def _write_chunk(self, key: str, global_shape: tuple, offsets: tuple, tensor: torch.Tensor):
        if self.finalized:
            raise RuntimeError("checkpoint writer already finalized")
        t = tensor.detach().to("cpu").contiguous()
        if t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.clone()  # torch.save writes the whole storage of a view
        meta = self._meta.get(key)
        if meta is None:
            meta = TensorStorageMetadata(TensorProperties(dtype=t.dtype), torch.Size(global_shape), [])
            self._meta[key] = meta
        elif not isinstance(meta, TensorStorageMetadata) or tuple(meta.size) != tuple(global_shape):
            raise ValueError(f"{key}: global shape {tuple(global_shape)} conflicts with "
                             f"{tuple(meta.size)} written before")
        elif meta.properties.dtype != t.dtype:
            raise ValueError(f"{key}: dtype {t.dtype} conflicts with {meta.properties.dtype}")
        index = MetadataIndex(key, offsets)
        if index in self._storage:
            raise ValueError(f"{key}: chunk at offset {offsets} written twice")
        self._storage[index] = self._append(t)
        meta.chunks.append(ChunkStorageMetadata(torch.Size(offsets), torch.Size(t.shape)))
        self.tensors_written += 1

    def write(self, key: str, tensor: torch.Tensor) -> None:
        """A whole (global) tensor, as one chunk."""
        self._write_chunk(key, tuple(tensor.shape), (0,) * tensor.dim(), tensor)

    def write_layer(self, key: str, layer: int, num_layers: int, tensor: torch.Tensor) -> None:
        """Layer ``layer`` of the stacked tensor ``key`` of global shape ``[num_layers, *tensor.shape]``."""
        if not 0 <= layer < num_layers:
            raise IndexError(f"{key}: layer {layer} out of range [0, {num_layers})")
        written = self._layers_written.setdefault(key, set())
        self._write_chunk(key, (num_layers, *tensor.shape), (layer,) + (0,) * tensor.dim(),
                          tensor.unsqueeze(0))
        written.add(layer)
        if self.extra_state and _owns_extra_state(key):
            module = key.rpartition(".")[0]
            self.write_object(f"{module}.{EXTRA_STATE}", None, layer=layer, num_layers=num_layers)

    def write_object(self, key: str, obj: Any, layer: Optional[int] = None,
                     num_layers: Optional[int] = None) -> str:
        """A Megatron ``ShardedObject`` (one per layer when ``layer`` is given). Returns its unique key."""
        offsets, shape = ((layer,), (num_layers,)) if layer is not None else ((0,), (1,))
        unique = sharded_object_key(key, offsets, shape)
        index = MetadataIndex(unique)
        if index in self._storage:
            raise ValueError(f"object {unique} written twice")
        buf = io.BytesIO()
        torch.save([obj], buf)  # Megatron stores the list of the objects sharing the key
        self._storage[index] = self._append(buf.getbuffer())
        self._meta[unique] = BytesStorageMetadata()
        return unique

    # ---- finish -------------------------------------------------------------------------------
    def finalize(self, common: Optional[dict] = None) -> str:
        """Write the metadata and move the checkpoint into place. Returns the checkpoint root."""
        if self.finalized:
            return self.root
        try:
            for key, meta in self._meta.items():
                if key in self._layers_written and len(self._layers_written[key]) != meta.size[0]:
                    missing = sorted(set(range(meta.size[0])) - self._layers_written[key])
                    raise ValueError(f"{key}: layers {missing[:8]} were never written")
            self._file.close()
            self._file = None
            metadata = Metadata(
                state_dict_metadata=self._meta, planner_data=None, storage_data=self._storage,
                storage_meta=StorageMeta(checkpoint_id=self.root, save_id=uuid.uuid4().hex),
            )
            with open(os.path.join(self.tmp_iter, METADATA_FILE), "wb") as f:
                pickle.dump(metadata, f)
            torch.save({**(common or {}), manifest.COMMON_KEY: manifest.MANIFEST_FILE},
                       os.path.join(self.tmp_iter, COMMON_FILE))
            with open(os.path.join(self.tmp_iter, MEGATRON_CONFIG_FILE), "w") as f:
                json.dump(MEGATRON_CONFIG, f)
            manifest.write(self.tmp_iter)  # last in the iteration directory
            self.cfg.save(os.path.join(self.tmp_root, CONFIG_FILE))
            with open(os.path.join(self.tmp_root, TRACKER_FILE), "w") as f:
                f.write(f"{self.iteration}\n")
            # Swap into place: the old output (with --force) is removed only after the new one is
            # complete, and the new one appears under its name in one rename.
            old = None
            if os.path.exists(self.root):
                old = f"{self.tmp_root}.old"
                os.replace(self.root, old)
            os.replace(self.tmp_root, self.root)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            self.abort()
            raise
        self.finalized = True
        return self.root


# ---- surgery ----------------------------------------------------------------------------------
def model_keys(reader: CheckpointReader) -> tuple:
    """(stacked per-layer keys, other model keys) of a checkpoint, in a stable order."""
    keys = sorted(k for k in reader.keys() if k.startswith(MODEL_KEY_PREFIXES))
    stacked = [k for k in keys if reader.is_stacked(k)]
    return stacked, [k for k in keys if k not in stacked]


def copy_side_files(src_root: str, writer: CheckpointWriter, same_model: bool = False) -> list:
    """Carry the files that travel with a checkpoint into the output root, unless it has them
    already: its ``tokenizer/``, and for an output of the same architecture (a merge) also the
    converter's ``hf/`` record of the original HF model and the DUS plan, which after surgery
    would describe the model before it. Nothing else of the root (logs, abandoned iterations)."""
    copied = []
    for entry in (TOKENIZER_SUBDIR, *((HF_SUBDIR, PLAN_FILE) if same_model else ())):
        src, dst = os.path.join(src_root, entry), writer.path(entry)
        if not os.path.exists(src) or os.path.exists(dst):
            continue
        if os.path.isdir(src):
            shutil.copytree(src, dst)
        else:
            shutil.copy2(src, dst)
        copied.append(entry)
    return copied


class Surgery:
    """Checkpoints of one model, opened for a streaming rewrite into a new one (see the module
    docstring). Every further input must hold the same tensors, of the same shapes, as the first
    (checked when writing, after the caller's own checks of the inputs)."""

    def __init__(self, sources: Sequence[str]):
        self.sources = list(sources)
        self.readers = [CheckpointReader(src) for src in sources]
        self.config = self.readers[0].config
        self.stacked, self.others = model_keys(self.readers[0])
        self.layers = max((self.readers[0].shape(k)[0] for k in self.stacked), default=0)

    def check_layers(self) -> None:
        """``CheckpointFormatError`` unless every stacked tensor has the config's layers."""
        first = self.readers[0]
        if not self.stacked:
            raise CheckpointFormatError(f"checkpoint {self.sources[0]} has no per-layer decoder "
                                        f"tensors")
        for key in self.stacked:
            if first.shape(key)[0] != self.config.num_layers:
                raise CheckpointFormatError(f"{key} has {first.shape(key)[0]} layers, the config "
                                            f"says {self.config.num_layers}")

    def write(self, out: str, cfg: ModelConfig, *,
              tensor: Optional[Callable[[str], torch.Tensor]] = None,
              layer: Optional[Callable[[int], Iterable[tuple]]] = None,
              layer_map: Optional[Sequence[int]] = None,
              files: Optional[Callable[[CheckpointWriter], None]] = None,
              same_model: bool = False, force: bool = False, progress: bool = True,
              desc: str = "layers") -> int:
        """Write the checkpoint ``out`` of ``cfg``; returns the bytes written.

        ``tensor(key)``: each non-layer model key's new tensor (default: the first input's).
        ``layer(old)``: ``(key, tensor)`` pairs of one new layer, made from layer ``old`` of the
        inputs, yielded one at a time (default: the first input's tensors of that layer).
        ``layer_map[new]``: the input layer new layer ``new`` is made from (default: the same
        layer; then a stacked input key keeps its own number of layers).
        ``files(writer)``: writes extra files; then the side files of every input follow
        (:func:`copy_side_files`: the first input's win)."""
        first = self.readers[0]
        for src, r in zip(self.sources[1:], self.readers[1:]):
            if model_keys(r) != (self.stacked, self.others) or \
                    any(r.shape(k) != first.shape(k) for k in self.stacked + self.others):
                raise CheckpointFormatError(f"{src} holds different tensors than {self.sources[0]}")
        counts = {k: first.shape(k)[0] for k in self.stacked} if layer_map is None else {}
        layer_map = range(self.layers) if layer_map is None else layer_map
        tensor = tensor or first.read
        layer = layer or (lambda old: ((key, first.read_layer(key, old)) for key in self.stacked
                                       if old < first.shape(key)[0]))
        with CheckpointWriter(out, cfg, force=force) as writer:
            for key in self.others:
                writer.write(key, tensor(key))
            for new, old in enumerate(cli.progress(layer_map, desc=desc, unit="layer",
                                                   enabled=progress)):
                for key, t in layer(old):
                    writer.write_layer(key, new, counts.get(key, len(layer_map)), t)
                    del t  # gone before the next one is made
            if files is not None:
                files(writer)
            for r in self.readers:
                copy_side_files(r.root, writer, same_model)
            return writer.bytes_written
