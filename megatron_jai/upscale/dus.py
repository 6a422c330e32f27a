"""DUS.v2 depth up-scaling of a checkpoint: copy base layers into the new order of a
:class:`~megatron_jai.upscale.plan.LayerPlan` and record the plan's skips in the new config.

Streams layer by layer with :mod:`megatron_jai.checkpoint.stream`: at most one layer of one tensor
is in memory, whatever the TP/PP/EP the source checkpoint was saved with.
"""
from __future__ import annotations

import os

from megatron_jai.checkpoint.stream import PLAN_FILE, Surgery
from megatron_jai.config import ModelConfig
from megatron_jai.upscale.plan import LayerPlan, PlanError, save_plan


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
    surgery = Surgery([src])
    surgery.check_layers()
    base = surgery.config
    cfg = dus_config(base, plan, name)
    layer_map = plan.layer_map()
    bytes_written = surgery.write(out, cfg, layer_map=layer_map, force=force, progress=progress,
                                  desc="dus layers",
                                  files=lambda writer: save_plan(plan, writer.path(PLAN_FILE)))
    counts = cfg.parameter_counts()
    return {"out": os.path.abspath(out), "base_layers": base.num_layers, "layers": cfg.num_layers,
            "layer_map": layer_map, "skips": len(cfg.skip_connections), "config": cfg,
            "params_total": counts["total"], "params_active": counts["active"],
            "bytes": bytes_written}
