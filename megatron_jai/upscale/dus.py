"""DUS.v2 depth up-scaling of a checkpoint: copy base layers into the new order of a
:class:`~megatron_jai.upscale.plan.LayerPlan` and record the plan's skips in the new config.

Streams layer by layer with :mod:`megatron_jai.checkpoint.stream`: at most one layer of one tensor
is in memory, whatever the TP/PP/EP the source checkpoint was saved with.
"""
from __future__ import annotations

import os
import shutil

from megatron_jai.checkpoint.stream import CheckpointReader, CheckpointWriter
from megatron_jai.cli import progress as progress_bar
from megatron_jai.config import ModelConfig
from megatron_jai.upscale.plan import LayerPlan, PlanError, save_plan

# Checkpoint keys that belong to the model (optimizer states and the like are not carried over:
# surgery produces a fresh iteration-0 checkpoint).
MODEL_KEY_PREFIXES = ("embedding.", "decoder.", "output_layer.")
PLAN_FILE = "dus_plan.json"


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
    from megatron_jai.checkpoint.convert import HF_SUBDIR
    from megatron_jai.checkpoint.dist import TOKENIZER_SUBDIR

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


def dus_config(base: ModelConfig, plan: LayerPlan, name: str | None = None) -> ModelConfig:
    """The up-scaled model's config: the plan's depth and skips on the base architecture."""
    if base.num_layers != plan.base_layers:
        raise PlanError(f"plan {plan.name!r} is for a {plan.base_layers}-layer base model, but "
                        f"the checkpoint has {base.num_layers} layers")
    if base.skip_connections:
        raise PlanError("the input model already has skip connections; depth up-scaling starts "
                        "from a model without them")
    return base.replace(name=name or f"{base.name}-dus{plan.num_layers}",
                        num_layers=plan.num_layers, skip_connections=plan.skip_connections)


def depth_upscale(src: str, out: str, plan: LayerPlan, *, name: str | None = None,
                  force: bool = False, progress: bool = True) -> dict:
    """Write the depth up-scaled checkpoint ``out`` from ``src``. Returns a summary dict."""
    reader = CheckpointReader(src)
    base = reader.config
    cfg = dus_config(base, plan, name)
    stacked, others = model_keys(reader)
    if not stacked:
        raise PlanError(f"checkpoint {src} has no per-layer decoder tensors")
    for key in stacked:
        if reader.shape(key)[0] != base.num_layers:
            raise PlanError(f"{key} has {reader.shape(key)[0]} layers, the config says "
                            f"{base.num_layers}")
    layer_map = plan.layer_map()
    with CheckpointWriter(out, cfg, force=force) as writer:
        for key in others:
            writer.write(key, reader.read(key))
        for new, old in enumerate(progress_bar(layer_map, desc="dus layers", unit="layer",
                                               enabled=progress)):
            for key in stacked:
                writer.write_layer(key, new, cfg.num_layers, reader.read_layer(key, old))
        copy_side_files(reader.root, writer)
        save_plan(plan, writer.path(PLAN_FILE))
        bytes_written = writer.bytes_written
    counts = cfg.parameter_counts()
    return {"out": os.path.abspath(out), "base_layers": base.num_layers, "layers": cfg.num_layers,
            "layer_map": layer_map, "skips": len(cfg.skip_connections), "config": cfg,
            "params_total": counts["total"], "params_active": counts["active"],
            "bytes": bytes_written}
