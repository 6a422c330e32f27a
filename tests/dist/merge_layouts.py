"""torchrun helper (2 processes): merging checkpoints saved at different layouts, end to end.

1. Three random MoE models are saved with ``save_checkpoint`` at TP=2, PP=2 and EP=2.
2. Rank 0 merges them (linear 1:1:1) into M with ``merge_checkpoints``.
3. The three inputs and M load (strictly) into TP=2 models, and every local shard of M equals the
   elementwise mean of the inputs' shards (experts and router included).
4. ``pretrain_jai.py --init-from M`` trains a few steps on the demo corpus (EP=2).

Usage: merge_layouts.py OUT_DIR
"""
import os
import sys

import torch
import torch.distributed as dist

from megatron_jai import parallel
from megatron_jai.checkpoint.dist import load_checkpoint, save_checkpoint
from megatron_jai.presets import TINY_MOE
from megatron_jai.model import build_model

CFG = TINY_MOE.replace(name="tiny-moe-merge", num_layers=2)
LAYOUTS = {"tp2": dict(tp=2), "pp2": dict(pp=2), "ep2": dict(ep=2)}


def build(layout: dict, seed: int = 0):
    parallel.initialize(layout.get("tp", 1), layout.get("pp", 1), layout.get("ep", 1), seed=seed)
    torch.manual_seed(seed)
    return build_model(CFG, **layout)


def main(out: str) -> None:
    inputs = []
    for seed, (name, layout) in enumerate(LAYOUTS.items(), start=1):
        root = os.path.join(out, name)
        save_checkpoint(root, [build(layout, seed)], CFG, iteration=10 * seed)
        inputs.append(root)
    merged = os.path.join(out, "merged")
    if dist.get_rank() == 0:
        from megatron_jai.checkpoint.merge import merge_checkpoints

        merge_checkpoints("linear", inputs, merged, progress=False)
    dist.barrier()

    models = []
    for root in inputs + [merged]:
        model = build(LAYOUTS["tp2"])
        load_checkpoint(root, [model])
        models.append(dict(model.state_dict()))
    *sources, result = models
    checked = 0
    for key, value in result.items():
        if key.endswith("_extra_state") or not torch.is_floating_point(value):
            continue
        mean = torch.stack([s[key] for s in sources]).mean(0)
        assert torch.allclose(value, mean, rtol=0, atol=1e-7), f"{key} differs"
        checked += any(p in key for p in ("experts", "router"))
    assert checked >= 3, "expert and router tensors were not compared"
    print(f"rank {dist.get_rank()}: merged == mean of the inputs saved at TP=2, PP=2, EP=2",
          flush=True)

    import pretrain_jai

    rc = pretrain_jai.main(["--init-from", merged, "--ep", "2", "--train-iters", "3",
                            "--seq-length", "32", "--micro-batch-size", "2",
                            "--global-batch-size", "4", "--log-interval", "1"])
    assert rc == 0, f"pretrain_jai.py --init-from {merged} exited with {rc}"


if __name__ == "__main__":
    main(sys.argv[1])
