"""torchrun helper (2 ranks): greedy generation (KV cache on and off) and log-probs of a checkpoint
at TP=2, PP=2 and EP=2 equal the single-rank reference written by the test."""
import json
import sys

import torch

from megatron_jai import parallel
from megatron_jai.inference.generation import SamplingParams, StopCondition
from megatron_jai.inference.lm import MegatronLM


def main(ckpt: str, reference_file: str) -> None:
    with open(reference_file) as f:
        ref = json.load(f)
    parallel.initialize()  # one process group for all layouts (each model re-makes its groups)
    for tp, pp, ep in ((2, 1, 1), (1, 2, 1), (1, 1, 2)):
        lm = MegatronLM(ckpt, tp=tp, pp=pp, ep=ep)
        for cache in (True, False):
            gen = lm.generate(ref["prompt"], SamplingParams(max_new_tokens=len(ref["greedy"])),
                              StopCondition(), use_cache=cache)
            assert gen.ids == ref["greedy"], (tp, pp, ep, cache, gen.ids, ref["greedy"])
        log_probs = lm.log_probs(torch.tensor([ref["prompt"]]))
        torch.testing.assert_close(log_probs, torch.tensor(ref["log_probs"]), atol=2e-5, rtol=0)
        if lm.is_main:
            print(f"OK {lm.layout}", flush=True)
        lm.close()
    parallel.destroy()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
