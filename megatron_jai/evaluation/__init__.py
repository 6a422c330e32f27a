"""Evaluation: metrics (:mod:`.metrics`), text scoring windows (:mod:`.scoring`), the tasks
(:mod:`.tasks`, :mod:`.runner`) and lm-evaluation-harness on local task files (:mod:`.harness`,
``lm_eval_tasks/``). See docs/evaluation.md."""
