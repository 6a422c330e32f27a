"""Under torchrun (gloo): both ranks call ensure_demo_data at once (one builds, the other waits),
then build the same blended datasets (rank 0 writes the index caches first, as Megatron-Core does).
Prints one line per rank with the blend shares and a checksum of the first samples."""
import os
import sys

import torch
import torch.distributed as dist

from megatron_jai.data import build_datasets, ensure_demo_data, sample_shares


def main(cache_dir: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    demo = ensure_demo_data(cache_dir, log=None)
    train, valid = build_datasets({demo.data_prefix: 0.7, demo.valid_prefix: 0.3}, seq_length=64,
                                  num_samples=200, seed=3, tokenizer=demo.tokenizer_path,
                                  split="9,1", cache_dir=os.path.join(cache_dir, "idx"))
    checksum = torch.tensor([sum(int(train[i]["tokens"].sum()) for i in range(20))])
    sums = [torch.zeros_like(checksum) for _ in range(dist.get_world_size())]
    dist.all_gather(sums, checksum)
    assert len({int(s) for s in sums}) == 1, f"ranks disagree on the samples: {sums}"
    shares = sample_shares(train)
    print(f"rank {rank}: train {len(train)} valid {len(valid)} "
          f"shares {[round(v, 3) for v in shares.values()]} checksum {int(checksum)}", flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
