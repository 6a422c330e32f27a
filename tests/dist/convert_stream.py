"""torchrun helper (2 processes): the streaming reader/writer against real Megatron-Core models.

1. A TP=2 model saved with ``save_checkpoint`` is read by ``CheckpointReader``: every local shard
   of every rank equals the reader's region of the global tensor.
2. Rank 0 writes a new checkpoint with ``CheckpointWriter`` (fresh random values, per-layer chunks).
3. It loads (strict) into models built at TP=2, PP=2 and TP=1 (DP=2), and every local shard equals
   what the writer wrote.
"""
import sys

import torch
import torch.distributed as dist

from megatron_jai import parallel
from megatron_jai.checkpoint.dist import load_checkpoint, save_checkpoint
from megatron_jai.checkpoint.stream import CheckpointReader, CheckpointWriter
from megatron_jai.presets import TINY
from megatron_jai.model import build_model


def local_shards(model):
    """``(key, local tensor, global offset, global shape)`` for each local shard of the model."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

    sd = model.sharded_state_dict()
    apply_factories(sd)
    for sh in nested_values(sd):
        if isinstance(sh, ShardedTensor):
            # local_shape leaves out the prepended (layer) axes that global_offset includes
            yield (sh.key, sh.data, sh.global_offset, (1,) * sh.prepend_axis_num + tuple(sh.local_shape),
                   sh.global_shape)


def check_against(reader, model, what):
    n = 0
    for key, data, offset, local_shape, global_shape in local_shards(model):
        assert tuple(reader.shape(key)) == tuple(global_shape), (key, reader.shape(key), global_shape)
        region = reader.read_region(key, tuple(offset), tuple(local_shape))
        assert torch.equal(region.reshape(data.shape), data.detach()), f"{what}: {key} differs"
        n += 1
    assert n > 0
    return n


def main(out_dir: str) -> None:
    saved, written = f"{out_dir}/saved", f"{out_dir}/written"
    cfg = TINY.replace(vocab_size=200)  # padded to 256: padding rows are part of the tensors

    parallel.initialize(tp=2, pp=1, seed=7)
    model = build_model(cfg, tp=2)
    save_checkpoint(saved, [model], cfg, iteration=3)
    n = check_against(CheckpointReader(saved), model, "saved")
    print(f"rank {dist.get_rank()}: reader == save_checkpoint on {n} shards")

    if dist.get_rank() == 0:
        reader = CheckpointReader(saved)
        assert reader.iteration == 3 and reader.config == cfg
        gen = torch.Generator().manual_seed(11)
        with CheckpointWriter(written, cfg, iteration=5) as w:
            for key in reader.keys():
                shape = reader.shape(key)
                if reader.is_stacked(key):
                    for layer in range(shape[0]):
                        w.write_layer(key, layer, shape[0], torch.randn(shape[1:], generator=gen))
                else:
                    w.write(key, torch.randn(shape, generator=gen))
        assert sorted(CheckpointReader(written).object_keys()) == sorted(reader.object_keys())
    dist.barrier()

    for tp, pp in ((2, 1), (1, 2), (1, 1)):
        parallel.initialize(tp=tp, pp=pp, seed=99)
        model = build_model(cfg, tp=tp, pp=pp)
        iteration, _ = load_checkpoint(written, [model])
        assert iteration == 5
        n = check_against(CheckpointReader(written), model, f"tp{tp}pp{pp}")
        print(f"rank {dist.get_rank()}: writer checkpoint loaded at TP={tp} PP={pp}, {n} shards equal")
    parallel.destroy()


if __name__ == "__main__":
    main(sys.argv[1])
