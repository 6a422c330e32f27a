"""``pretrain_jai.py --dry-run --world-size N`` (and ``posttrain_jai.py ... --dry-run``): one CPU
process, no GPU, no process group.

It resolves the run exactly as a launch would (flags + YAML, presets, ``--load`` / ``--init-from``
configs, phases and plans), applies every layout and divisibility rule the launch applies
(Megatron-Core's ``TransformerConfig``, the parallel layout, batch sizes, LR schedules, validation
data, and unless ``--no-file-checks`` the data, tokenizer and checkpoint files), and prints:

* the per-stage layer layout and which DUS skips cross stage boundaries;
* parameters per GPU of every stage;
* the estimated memory per GPU of every stage (:mod:`~.memory_estimate` arithmetic) for each
  phase's sequence length and recompute setting;
* the phase plan: steps, batch, tokens, learning rates, RoPE.

Every problem is one line; the exit status is 2 when there is any, 0 otherwise. The launch is
assumed to be on GPUs (bf16 and the distributed optimizer unless the config says otherwise).
"""
from __future__ import annotations

import os
import sys
from typing import Optional

from megatron_jai.training.faults import TrainingError

GPU_MEMORY_GIB = 80.0  # H100 SXM


class DryRun:
    def __init__(self, args, objective=None, prog: str = "pretrain_jai.py"):
        from megatron_jai.training.objectives.pretrain import PretrainObjective

        self.args = args
        self.objective = objective or PretrainObjective(args)
        self.prog = prog
        self.problems: list = []
        self.out: list = []

    def problem(self, message: str) -> None:
        self.problems.append(message)

    def check(self, fn, *a, **kw):
        """Run one check; a user error becomes a problem line. Returns fn's result or None."""
        try:
            return fn(*a, **kw)
        except (TrainingError, ValueError, OSError) as err:
            self.problem(" ".join(str(err).split()))
            return None

    # -------------------------------------------------------------------------------------------
    def run(self) -> int:
        from megatron_jai.training.loop import apply_device_defaults

        args = self.args
        apply_device_defaults(args, on_gpu=True)
        world = args.world_size
        cfg = self.check(self._resolve_model)
        phases = self.check(self._phases)
        if cfg is None or phases is None:
            return self._finish(None, None, world)
        dp = self._layout(cfg, world)
        self._transformer_config(cfg, phases)
        if dp:
            self._batches(phases, dp)
        self._schedules(phases)
        from megatron_jai.training.data_loading import check_validation

        self.check(check_validation, phases, args.eval_interval)
        if args.file_checks:
            self._files(cfg, phases)
        if dp:
            self._report(cfg, phases, world, dp)
        return self._finish(cfg, phases, world)

    def _resolve_model(self):
        from megatron_jai.presets import load_model_config
        from megatron_jai.training.loop import resolve_run

        args = self.args
        if args.file_checks or (args.load and os.path.exists(args.load)):
            _, cfg, note = resolve_run(args)
            if note:
                self.out.append(f"note: {note}")
            return cfg
        source = args.model or args.init_from
        if source is None and args.load:
            raise TrainingError("--no-file-checks: the model of --load is not readable here; "
                                "give --model (a preset or model_config.json)")
        try:
            return load_model_config(source or "tiny")
        except (ValueError, OSError) as err:
            raise TrainingError(f"model {source!r}: {err} (give --model a preset or "
                                f"model_config.json when --init-from is not readable here)") \
                from None

    def _phases(self):
        from megatron_jai.training.arguments import flag_phase

        args = self.args
        if args.phases:
            return args.phases
        return [flag_phase(args, demo_prefix="(demo corpus)" if not args.data_path else None,
                           name=self.objective.name)]

    def _layout(self, cfg, world: int) -> Optional[int]:
        args = self.args
        tp, pp, ep = args.tp, args.pp, args.ep
        if world % (tp * pp):
            self.problem(f"world size {world} is not a multiple of TP*PP = {tp}*{pp}")
            return None
        dp = world // (tp * pp)
        if args.dp is not None and args.dp != dp:
            self.problem(f"--dp {args.dp} does not match world size {world} / (TP {tp} * PP {pp}) "
                         f"= {dp}")
        if ep > 1 and not cfg.is_moe:
            self.problem(f"--ep {ep} needs an MoE model ({cfg.name} has no experts)")
        if cfg.is_moe and (world // pp) % (tp * ep):
            self.problem(f"world/PP = {world // pp} is not a multiple of EP*ETP = {ep}*{tp} "
                         f"(experts are tensor-parallel like the dense layers)")
        if args.sequence_parallel and tp == 1:
            self.out.append("note: --sequence-parallel has no effect at TP=1")
        return dp

    def _transformer_config(self, cfg, phases) -> None:
        import torch

        args = self.args
        max_seq = max(p.seq_length for p in phases)
        if max_seq > cfg.max_position_embeddings:
            cfg = cfg.replace(max_position_embeddings=max_seq)
        self.check(cfg.transformer_config, tp=args.tp, pp=args.pp, ep=args.ep,
                   params_dtype=torch.bfloat16 if args.bf16 else torch.float32,
                   sequence_parallel=args.sequence_parallel,
                   first_stage_layers=args.first_stage_layers,
                   last_stage_layers=args.last_stage_layers)

    def _batches(self, phases, dp: int) -> None:
        for p in phases:
            gbs = p.global_batch_size or self.args.global_batch_size
            mbs = p.micro_batch_size or self.args.micro_batch_size
            if gbs % (mbs * dp):
                self.problem(f"phase {p.name}: global batch {gbs} is not a multiple of micro batch "
                             f"{mbs} x DP {dp}")

    def _schedules(self, phases) -> None:
        from megatron_jai.training.schedule import phase_schedule

        for p in phases:
            gbs = p.global_batch_size or self.args.global_batch_size
            self.check(phase_schedule, self.args, p, p.iterations(gbs))

    def _files(self, cfg, phases) -> None:
        from megatron_jai.training import checkpointing

        args = self.args
        if args.init_from and not args.load:
            if not checkpointing.has_checkpoint(args.init_from):
                self.problem(f"--init-from {args.init_from}: no complete checkpoint there")
        if args.tokenizer is None:
            args.tokenizer = checkpointing.checkpoint_tokenizer(args.load or args.init_from)
        if args.phases or args.data_path:
            self.check(self.objective.check_data, cfg, phases)
        resume = None
        if args.load and checkpointing.has_checkpoint(args.load):
            resume = args.load_iteration if args.load_iteration is not None else \
                checkpointing.dist_ckpt.latest_iteration(args.load)
        self.check(checkpointing.plan_save_dir, args.save,
                   load=args.load if resume is not None else None, resume_iteration=resume,
                   init_from=args.init_from, overwrite=args.overwrite_save)

    # -------------------------------------------------------------------------------------------
    def _report(self, cfg, phases, world: int, dp: int) -> None:
        from megatron_jai.parallel import pipeline_stage_layers
        from megatron_jai.training.memory_estimate import GiB, estimate_stages
        from megatron_jai.parallel import crossing_skips

        args = self.args
        try:
            sizes = pipeline_stage_layers(cfg.num_layers, args.pp, args.first_stage_layers,
                                          args.last_stage_layers)
        except ValueError:
            return  # reported by the transformer-config check
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        self.out.append(f"layout: {world} GPUs = TP {args.tp} x PP {args.pp} x DP {dp}"
                        + (f", EP {args.ep} (experts tensor-parallel over TP)" if cfg.is_moe else "")
                        + (", sequence parallel" if args.sequence_parallel and args.tp > 1 else "")
                        + f"; {'bf16' if args.bf16 else 'fp32'}, "
                        + ("distributed" if args.use_distributed_optimizer else "plain")
                        + " optimizer")
        # Memory for each phase (sequence length and recompute differ); the stage table shows the
        # most demanding one.
        capacity = args.gpu_memory_gib or GPU_MEMORY_GIB
        per_phase = []
        for p in phases:
            mbs = (p.micro_batch_size or args.micro_batch_size) * self.objective.sequences_per_sample
            gbs = p.global_batch_size or args.global_batch_size
            recompute = p.recompute_activations if p.recompute_activations is not None \
                else args.recompute_activations
            est = self.check(estimate_stages, cfg, world, args.tp, args.pp, args.ep,
                             seq_length=p.seq_length, micro_batch_size=mbs,
                             recompute="full" if recompute else "none",
                             distributed_optimizer=bool(args.use_distributed_optimizer),
                             stage_layers=sizes,
                             num_microbatches=max(1, gbs // ((p.micro_batch_size
                                                             or args.micro_batch_size) * dp)))
            if est is None:
                return
            per_phase.append((p, est))
        worst_phase, worst = max(per_phase, key=lambda pe: max(e.total for e in pe[1]))
        self.out.append(f"pipeline stages (memory for phase {worst_phase.name}, "
                        f"{worst_phase.seq_length} tokens; estimate, not a measurement):")
        rows = [("stage", "layers", "skips crossing into it", "params/GPU", "weights+grads",
                 "optimizer", "activations", "total/GPU")]
        for s, (start, n, e) in enumerate(zip(starts, sizes, worst)):
            crossing = crossing_skips(cfg.skip_connections, [start]) if s else []
            rows.append((str(s), f"{start}-{start + n - 1} ({n})",
                         ", ".join(f"{k.source}->{k.target}" for k in crossing) or "-",
                         _count(e.params), f"{(e.weights + e.grads) / GiB:.1f} GiB",
                         f"{e.optimizer / GiB:.1f} GiB",
                         f"{(e.activations + e.logits) / GiB:.1f} GiB", f"{e.total / GiB:.1f} GiB"))
        self.out += _table(rows)
        local = [k for k in cfg.skip_connections
                 if not crossing_skips([k], starts[1:])]
        if cfg.skip_connections:
            self.out.append(f"DUS skips: {len(cfg.skip_connections)}, "
                            f"{len(cfg.skip_connections) - len(local)} cross a stage boundary "
                            f"(their saved states travel with the activations)")
        for p, est in per_phase:
            fullest = max(est, key=lambda e: e.total)
            if fullest.total / GiB > capacity:
                self.problem(f"phase {p.name}: estimated {fullest.total / GiB:.1f} GiB on the "
                             f"fullest GPU (stage {est.index(fullest)}) exceeds {capacity:g} GiB "
                             f"(--gpu-memory-gib); add recompute, PP or TP")
        self._phase_plan(phases)

    def _phase_plan(self, phases) -> None:
        from megatron_jai.training.schedule import phase_schedule

        args = self.args
        rows = [("phase", "steps", "batch x seq", "tokens", "LR peak -> min", "warm-up/decay",
                 "RoPE base / interp.", "recompute", "blend")]
        total_steps = total_tokens = 0
        for p in phases:
            gbs = p.global_batch_size or args.global_batch_size
            steps = p.iterations(gbs)
            tokens = steps * gbs * p.seq_length * self.objective.sequences_per_sample
            total_steps, total_tokens = total_steps + steps, total_tokens + tokens
            try:
                s = phase_schedule(args, p, steps)
                lr = f"{s['max_lr']:.3g} -> {s['min_lr']:.3g}"
                wd = f"{s['lr_warmup_steps']}/{s['lr_decay_steps']} {s['lr_decay_style']}"
            except TrainingError:
                lr = wd = "invalid"
            recompute = p.recompute_activations if p.recompute_activations is not None \
                else args.recompute_activations
            labels = p.dataset_names or tuple(os.path.basename(x) for _, x in p.blend)
            rows.append((p.name, f"{steps:,}", f"{gbs} x {p.seq_length}", _count(tokens), lr, wd,
                         f"{p.rotary_base or '-'} / {p.rotary_interpolation_factor or '-'}",
                         "full" if recompute else "-",
                         ", ".join(f"{lab} {w:.0%}" for lab, (w, _) in zip(labels, p.blend))))
        if args.train_iters is not None and args.phases:
            self.out.append(f"note: --train-iters {args.train_iters} stops the run early")
        self.out.append(f"phase plan: {len(phases)} phase(s), {total_steps:,} steps, "
                        f"{_count(total_tokens)} tokens")
        self.out += _table(rows)

    def _finish(self, cfg, phases, world: int) -> int:
        for line in self.out:
            print(line)
        sys.stdout.flush()
        for message in self.problems:
            print(f"{self.prog}: error: {message}", file=sys.stderr, flush=True)
        what = f"{cfg.name} on {world} GPU(s)" if cfg is not None else f"{world} GPU(s)"
        if self.problems:
            print(f"dry run: {len(self.problems)} problem(s) that would fail the launch of {what}")
            return 2
        print(f"dry run: OK, {what} would launch")
        return 0


def _count(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def _table(rows: list) -> list:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    return ["  " + "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


def dry_run(args, objective=None, prog: str = "pretrain_jai.py") -> int:
    return DryRun(args, objective, prog).run()
