"""lm-evaluation-harness on a Hugging Face directory, offline, on the local task YAMLs.

The harness gets the model already loaded by :class:`~megatron_jai.inference.lm.HuggingFaceLM`
(its ``hf`` backend, ``HFLM``, wraps it) and a ``transformers`` tokenizer from local files. Hub
access is switched off (``HF_HUB_OFFLINE``, ``HF_DATASETS_OFFLINE``) before the harness is
imported; the tasks come from ``lm_eval_tasks/`` (plus ``--lm-eval-include`` folders) only, and
their data from local files (``custom_dataset`` functions). The same tasks run from the harness's
own command line::

    lm_eval --model hf --model_args pretrained=HF_DIR,trust_remote_code=True \\
        --include_path megatron_jai/evaluation/lm_eval_tasks --tasks ntrex_th_mc
"""
from __future__ import annotations

import os

from megatron_jai.cli import UserError
from megatron_jai.paths import shared_path

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def _hf_tokenizer(path: str):
    from transformers import AutoTokenizer

    directory = path if os.path.isdir(path) else os.path.dirname(path)
    try:
        return AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except Exception as err:  # transformers raises many types for unloadable directories
        raise UserError(f"lm-eval needs a transformers tokenizer; {directory} has none "
                        f"({str(err).splitlines()[0]})") from None


def run_lm_eval_task(lm, task: str, opts) -> dict:
    """Run one local lm-eval task on ``lm`` (a HuggingFaceLM); its metrics without lm-eval's
    ``,none`` filter suffix, and ``items``."""
    os.environ.update(OFFLINE)
    import logging

    from megatron_jai.evaluation.tasks import LM_EVAL_TASK_DIR

    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    tokenizer = _hf_tokenizer(lm.tokenizer.path)
    model = HFLM(pretrained=lm.model, tokenizer=tokenizer, batch_size=opts.batch_size,
                 max_length=lm.context_length)
    manager = TaskManager(include_path=[LM_EVAL_TASK_DIR, *opts.lm_eval_dirs],
                          include_defaults=False)
    out = lm_eval.simple_evaluate(model=model, tasks=[task], task_manager=manager,
                                  limit=opts.limit, log_samples=False,
                                  metadata={"ntrex_dir": shared_path("data", "eval")})
    raw = out["results"][task]
    result = {k.split(",")[0]: v for k, v in raw.items()
              if "," in k and isinstance(v, (int, float))}
    result["items"] = int(out.get("n-samples", {}).get(task, {}).get("effective",
                                                                      raw.get("sample_len", 0)))
    return result
