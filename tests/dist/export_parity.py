"""torchrun (2 ranks) helper: JAI exports give Megatron's logits at TP=2, PP=2 and EP=2.

1. The JAI model of ``WORK/jai/model_config.json`` (skips crossing the PP boundary, 4 experts
   top-2) is built and initialised by Megatron at TP=2 and saved as a training run saves it;
   rank 0 exports it (``mcore_to_hf`` with ``TOKENIZER``) to ``WORK/jai_hf``.
2. Every case of ``WORK/cases.json`` (``[name, hf_dir, mcore_dir, tp, pp, ep, first, last]``) is
   compared with :func:`megatron_jai.inference.compare.compare_logits`, the process group staying
   up while the model-parallel layout changes. Rank 0 prints one ``RESULT {json}`` line per case.

Usage: export_parity.py WORK TOKENIZER
"""
import json
import os
import sys

import torch
import torch.distributed as dist

from megatron_jai import parallel
from megatron_jai.checkpoint.dist import save_checkpoint
from megatron_jai.hf.export import mcore_to_hf
from megatron_jai.inference.compare import compare_logits
from megatron_jai.model import build_model
from megatron_jai.presets import load_model_config


def main(work: str, tokenizer: str) -> None:
    cfg = load_model_config(os.path.join(work, "jai"))
    parallel.initialize(tp=2, seed=11)
    save_checkpoint(os.path.join(work, "jai_mc"), [build_model(cfg, tp=2)], cfg, iteration=5)
    if dist.get_rank() == 0:
        mcore_to_hf(os.path.join(work, "jai_mc"), os.path.join(work, "jai_hf"), progress=False,
                    tokenizer=tokenizer)
    dist.barrier()
    with open(os.path.join(work, "cases.json")) as f:
        cases = json.load(f)
    for name, hf_dir, mcore_dir, tp, pp, ep, first, last in cases:
        r = compare_logits(os.path.join(work, hf_dir), os.path.join(work, mcore_dir), tp=tp, pp=pp,
                           ep=ep, first_stage_layers=first, last_stage_layers=last, seq_len=24,
                           seed=3)
        if dist.get_rank() == 0:
            print("RESULT " + json.dumps({"case": name, "tp": tp, "pp": pp, "ep": ep, "first": first,
                                          "diff": r.max_abs_diff, "max_logit": r.max_abs_logit,
                                          "argmax": r.argmax_agreement}), flush=True)
    parallel.destroy()


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1], sys.argv[2])
