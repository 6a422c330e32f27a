"""The one training loop behind ``pretrain_jai.py`` and ``posttrain_jai.py``, on Megatron-Core.

* model: :func:`megatron_jai.model.build_model` (this rank's pipeline stage), ``Float16Module`` for
  bf16, Megatron-Core ``DistributedDataParallel`` (gradient buffers, DP all-reduce);
* optimizer: ``get_megatron_optimizer`` (Adam; the distributed optimizer on GPU, the plain one on
  CPU where Megatron-Core's distributed optimizer insists on CUDA tensors; :mod:`~.optimizer`) and
  ``OptimizerParamScheduler`` (:mod:`~.schedule`: one schedule per phase);
* schedules: ``get_forward_backward_func`` (1F1B for PP > 1);
* what a batch is and what loss it gives: an :class:`~.objectives.Objective` (pretraining, SFT,
  DPO); the loop itself never changes;
* data: read in a fixed global order from the phase's consumed-sample count, so resuming is exact
  (:mod:`~.data_loading`);
* checkpoints: :mod:`~.checkpointing`; faults: :mod:`~.faults`; metrics: :mod:`~.metrics`;
  phases: :mod:`~.phases`.

A run is :meth:`Trainer.setup` then :meth:`Trainer.train`, whose steps are the named methods
below (``enter_phase``, ``train_step``, ``step_record``, ``evaluate``, ``after_step``).
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch
import torch.distributed as dist

from megatron_jai.cli import UserError
from megatron_jai.training import checkpointing
from megatron_jai.training.arguments import flag_phase
from megatron_jai.training.checkpointing import TrainState
from megatron_jai.training.data_loading import data_iterator
from megatron_jai.training.faults import (PreemptionHandler, SkipTracker, TrainingError,
                                          testing_save_hook)
from megatron_jai.training.metrics import H100_BF16_PEAK_TFLOPS, MetricsLogger, throughput
from megatron_jai.training.objectives import (Objective, ObjectiveContext, make_loss_func,
                                              sums_by_name)
from megatron_jai.training.objectives.pretrain import PretrainObjective
from megatron_jai.training.optimizer import build_optimizer, optimizer_step
from megatron_jai.training.phases import Phase, apply_rope
from megatron_jai.training.schedule import build_scheduler, phase_schedule, restore_scheduler

DEMO_RUN_DIR = "runs/tiny_demo"


@dataclass
class RunSummary:
    steps: int = 0
    first_loss: Optional[float] = None
    last_loss: Optional[float] = None
    tokens_per_s: float = 0.0
    skipped: int = 0
    checkpoint: Optional[str] = None
    preempted: bool = False


@dataclass
class PhaseRun:
    """What the loop needs while it trains one phase."""

    index: int
    phase: Phase
    gbs: int
    mbs: int
    iters: int
    labels: tuple
    stat_names: list
    train_ds: object
    valid_ds: object
    scheduler: object
    num_micro: int  # micro-batches per step on each DP rank
    tokens_per_step: int  # all positions of a global batch (DPO: both answers of each pair)
    data_iter: object = None


@dataclass
class StepResult:
    step: int
    lr: float
    grad_norm: float
    updated: bool
    elapsed: float
    preempted: bool
    metrics: dict = field(default_factory=dict)


class Trainer:
    def __init__(self, args, objective: Optional[Objective] = None):
        self.args = args
        self.objective = objective or PretrainObjective(args)
        self.on_gpu = torch.cuda.is_available()
        self.device = torch.device("cpu")  # this rank's GPU is known after parallel.initialize
        self.resume_iteration: Optional[int] = None
        self._stale_iterations: list = []  # --overwrite-save: removed after the first new save

    # == setup ==================================================================================
    def setup(self) -> None:
        self._init_parallel()
        self._resolve_run()
        self._check_inputs()
        self._build_model_and_optimizer()
        self._load_or_initialise()
        self._reconcile_plan()
        self._prepare_save_dir()
        self.skips = SkipTracker(self.args.max_skipped_steps, total=self.state.skipped_steps)
        self.metrics = MetricsLogger(
            self.rank == 0, self.args.log_interval, self.args.metrics_file,
            self.args.tensorboard_dir, resume_step=self.state.iteration if self.resuming else 0)
        self._print_model_line()
        self.context = ObjectiveContext(
            args=self.args, cfg=self.cfg, tcfg=self.tcfg, model=self.model,
            ddp_model=self.ddp_model, phases=self.phases, resuming=self.resuming,
            device=self.device, rank=self.rank, dp=self.dp, dp_rank=self.dp_rank, log=self._print)
        self.objective.before_training(self.context)

    def _init_parallel(self) -> None:
        from megatron.core import parallel_state as ps

        from megatron_jai import parallel
        from megatron_jai.training import children

        args = self.args
        children.install()  # before any worker or writer process exists
        apply_device_defaults(args, self.on_gpu)
        try:
            parallel.initialize(args.tp, args.pp, args.ep, seed=args.seed)
        except ValueError as err:
            raise TrainingError(str(err)) from None
        from megatron_jai.training.rng import seed_host_generators

        seed_host_generators(args.seed)
        if self.on_gpu:  # initialize() selected this rank's GPU (LOCAL_RANK)
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()
        self.dp = ps.get_data_parallel_world_size()
        self.dp_rank = ps.get_data_parallel_rank()
        if args.dp is not None and args.dp != self.dp:
            raise TrainingError(f"--dp {args.dp} does not match world size {self.world} / "
                                f"(TP {args.tp} * PP {args.pp}) = {self.dp}")

    def _resolve_run(self) -> None:
        """Where the run starts (resume / init / scratch), its architecture and its phases. Reads
        only: nothing on disk changes before every check has passed."""
        args = self.args
        if args.eval_only:
            args.save = None  # evaluation writes no checkpoint and moves none
        if args.no_arguments:
            args.save = args.save or os.path.join(DEMO_RUN_DIR, "checkpoints")
            args.metrics_file = args.metrics_file or os.path.join(DEMO_RUN_DIR, "metrics.jsonl")
            args.overwrite_save = True
        read_only = self._lock_run_dirs()
        if self.rank == 0 and args.load and os.path.isdir(args.load) and args.load not in read_only:
            for it in checkpointing.dist_ckpt.recover_interrupted_commit(args.load):
                self._print(f"{args.load}: restored iteration {it}, whose re-save was interrupted")
        dist.barrier()
        checkpointing.verify_inputs(args.load, args.load_iteration, args.init_from, self._print)
        error = None
        try:
            resolved = resolve_run(args)
        except TrainingError as err:
            resolved, error = None, str(err)
        self._sync_errors(error if self.rank == 0 else None)
        self.resuming, self.cfg, note = resolved
        overrides = {k: getattr(args, k) for k in ("moe_aux_loss_coeff", "moe_z_loss_coeff")
                     if getattr(args, k, None) is not None}
        if overrides:
            if not self.cfg.is_moe:
                raise TrainingError(f"{', '.join('--' + k.replace('_', '-') for k in overrides)}: "
                                    f"model {self.cfg.name} has no experts")
            self.cfg = self.cfg.replace(**overrides)
        if note:
            self._print(note)
        data = None if args.data_path or args.phases else \
            self.objective.default_data(print if self.rank == 0 else None)
        self.phases = args.phases or [flag_phase(args, data, self.objective.name)]
        self._plan_save_dir()
        if args.tokenizer is None:
            args.tokenizer = checkpointing.checkpoint_tokenizer(
                args.load if self.resuming else args.init_from)

    def _lock_run_dirs(self) -> set:
        """Rank 0 takes --save's lock before anything is read or written; every rank learns the
        outcome (one line and exit 2 everywhere when another run holds it)."""
        error, read_only, self.save_lock = None, set(), None
        if self.rank == 0:
            try:
                self.save_lock, notes, read_only = checkpointing.lock_run_dirs(
                    self.args.save, self.args.load, self.args.init_from,
                    getattr(self.args, "force_unlock", False))
                for line in notes:
                    self._print(line)
            except UserError as err:
                error = str(err)
        self._sync_errors(error)
        return read_only

    def release(self) -> None:
        """Give --save's lock back (normal end, error, SIGTERM)."""
        if getattr(self, "save_lock", None) is not None:
            self.save_lock.release()
            self.save_lock = None

    def _check_inputs(self) -> None:
        error = None
        if self.rank == 0:
            try:
                self.objective.check_data(self.cfg, self.phases)
            except TrainingError as err:
                error = str(err)
        self._sync_errors(error)

    def _sync_errors(self, error: Optional[str]) -> None:
        """Rank 0 validated: every rank raises its error (one line from rank 0, exit 2 everywhere)
        instead of the others dying in a collective with a traceback."""
        message = [error]
        dist.broadcast_object_list(message, src=0)
        if message[0] is not None:
            raise TrainingError(message[0])

    def _build_model_and_optimizer(self) -> None:
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.distributed import finalize_model_grads
        from megatron.core.transformer.module import Float16Module

        from megatron_jai.model import build_model

        args = self.args
        dtype = torch.bfloat16 if args.bf16 else torch.float32
        max_seq = max(p.seq_length for p in self.phases)
        if max_seq > self.cfg.max_position_embeddings:
            self.cfg = self.cfg.replace(max_position_embeddings=max_seq)
        try:
            tcfg = self.cfg.transformer_config(tp=args.tp, pp=args.pp, ep=args.ep,
                                               params_dtype=dtype,
                                               sequence_parallel=args.sequence_parallel,
                                               first_stage_layers=args.first_stage_layers,
                                               last_stage_layers=args.last_stage_layers)
        except ValueError as err:
            raise TrainingError(str(err)) from None
        self.model = build_model(self.cfg, tcfg)  # this rank's stage; .jai_config lives here
        wrapped = Float16Module(tcfg, self.model) if args.bf16 else self.model
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            use_distributed_optimizer=args.use_distributed_optimizer,
            overlap_grad_reduce=False, overlap_param_gather=False)
        self.ddp_model = DistributedDataParallel(tcfg, ddp_config, wrapped)
        self.optimizer = build_optimizer(args, self.ddp_model, dtype)
        tcfg.no_sync_func = self.ddp_model.no_sync
        tcfg.finalize_model_grads_func = finalize_model_grads
        tcfg.grad_scale_func = self.optimizer.scale_loss
        self.tcfg = tcfg

    def _load_or_initialise(self) -> None:
        args = self.args
        self.state = TrainState()
        if self.resuming:
            self.state, rng_ok = checkpointing.load(args.load, self.model, self.optimizer,
                                                    iteration=args.load_iteration)
            self.resume_iteration = self.state.iteration
            rng_note = "" if rng_ok else (f" (layout changed from {self.state.layout}: RNG "
                                          f"states re-seeded)")
            self._print(f"resumed from {args.load} at iteration {self.state.iteration} "
                        f"({self._position()}){rng_note}")
        elif args.init_from:
            it = checkpointing.load_model_weights(args.init_from, self.model)
            self.optimizer.reload_model_params()
            self._print(f"initialised model weights from {args.init_from} (iteration {it})")

    def _position(self) -> str:
        s = self.state
        if s.phase_index >= len(self.phases):
            return f"all {len(self.phases)} phase(s) done"
        return f"phase {s.phase_index + 1}, step {s.phase_step}"

    def _reconcile_plan(self) -> None:
        """A resume whose phases are longer than the checkpoint's: reopen the last finished phase
        (``--train-iters`` / ``--train-tokens`` raised after a run ended)."""
        if not self.resuming:
            return
        for line in checkpointing.extend_finished_phase(self.state, self.phases, self._gbs):
            self._print(line)

    def _plan_save_dir(self) -> None:
        """Check --save against the run (reads only): nothing is deleted or moved before every
        check has passed (see :meth:`_prepare_save_dir`)."""
        args = self.args
        error, self._save_plan = None, None
        if self.rank == 0:
            resume = None
            if self.resuming:
                resume = args.load_iteration if args.load_iteration is not None else \
                    checkpointing.dist_ckpt.latest_iteration(args.load)
            try:
                self._save_plan = checkpointing.plan_save_dir(
                    args.save, load=args.load if self.resuming else None,
                    resume_iteration=resume, init_from=args.init_from,
                    overwrite=args.overwrite_save)
            except TrainingError as err:
                error = str(err)
        self._sync_errors(error)

    def _prepare_save_dir(self) -> None:
        """After every check and the load: a rollback's abandoned checkpoints are moved aside;
        what ``--overwrite-save`` replaces is deleted only after the first new checkpoint."""
        plan = self._save_plan
        if self.rank == 0 and plan is not None:
            self._stale_iterations = plan.stale_iterations
            if plan.abandoned:
                where = checkpointing.set_aside_abandoned(self.args.save, self.resume_iteration,
                                                          plan.abandoned)
                self._print(f"rolled back to iteration {self.resume_iteration}: moved the "
                            f"abandoned newer checkpoint(s) {plan.abandoned} to {where}")
        dist.barrier()

    def _print_model_line(self) -> None:
        from megatron_jai.parallel import pipeline_stage_layers

        args = self.args
        counts = self.cfg.parameter_counts()
        split = ""
        if args.first_stage_layers is not None or args.last_stage_layers is not None:
            split = " (stage layers " + "+".join(map(str, pipeline_stage_layers(
                self.cfg.num_layers, args.pp, args.first_stage_layers, args.last_stage_layers))) + ")"
        self._print(f"model {self.cfg.name}: {counts['total'] / 1e6:.2f}M parameters "
                    f"({counts['active'] / 1e6:.2f}M active), layout TP={args.tp} PP={args.pp}{split} "
                    f"EP={args.ep} DP={self.dp}, {'bf16' if args.bf16 else 'fp32'}, "
                    f"{'distributed' if args.use_distributed_optimizer else 'plain'} optimizer, "
                    f"objective {self.objective.describe()}, {len(self.phases)} phase(s): "
                    + ", ".join(f"{p.name} ({p.seq_length} tokens x {self._gbs(p)})"
                                for p in self.phases))

    def _print(self, msg: str) -> None:
        if self.rank == 0:
            print(msg, flush=True)

    def _gbs(self, phase: Phase) -> int:
        return phase.global_batch_size or self.args.global_batch_size

    def _mbs(self, phase: Phase) -> int:
        return phase.micro_batch_size or self.args.micro_batch_size

    # == one phase ==============================================================================
    def enter_phase(self, index: int) -> Optional[PhaseRun]:
        """Data, LR schedule, RoPE and recompute of phase ``index``; None when the phase has no
        step left (the config now gives it fewer steps than were done)."""
        args, state, phase = self.args, self.state, self.phases[index]
        gbs, mbs = self._gbs(phase), self._mbs(phase)
        if gbs % (mbs * self.dp):
            raise TrainingError(f"phase {phase.name}: global batch {gbs} is not a multiple of "
                                f"micro batch {mbs} x DP {self.dp}")
        iters = phase.iterations(gbs)
        if state.phase_step >= iters:
            self._print(f"phase {phase.name}: already {state.phase_step} of {iters} steps done; "
                        f"next phase")
            state.finish_phase(phase.name, None)
            return None
        self._set_recompute(phase)
        self._set_rope(phase)
        labels = phase.dataset_names or tuple(f"ds{i}" for i in range(len(phase.blend)))
        seed = args.seed + index
        try:
            train_ds = self.objective.build_dataset(phase.blend, phase.seq_length, iters * gbs,
                                                    seed)
            valid_ds = None
            if (args.eval_interval or args.eval_only) and phase.valid_blend:
                # Its own data, built apart: turning validation on never changes training.
                valid_ds = self.objective.build_valid_dataset(
                    phase.valid_blend, phase.seq_length, args.eval_iters * gbs, seed)
        except ValueError as err:
            raise TrainingError(f"phase {phase.name}: {err}") from None
        schedule = phase_schedule(args, phase, iters)
        scheduler = build_scheduler(self.optimizer, schedule)
        if state.scheduler is not None:
            for line in restore_scheduler(scheduler, state.scheduler, schedule,
                                          args.use_checkpoint_schedule):
                self._print(f"phase {phase.name}: {line}")
        run = PhaseRun(index, phase, gbs, mbs, iters, labels, self.objective.stat_names(labels),
                       train_ds, valid_ds, scheduler, num_micro=gbs // (mbs * self.dp),
                       tokens_per_step=gbs * phase.seq_length
                       * self.objective.sequences_per_sample)
        run.data_iter = data_iterator(train_ds, state.phase_consumed_samples, iters * gbs, mbs,
                                      self.dp_rank, self.dp, args.num_workers,
                                      self.objective.collate, seed=seed)
        return run

    def _set_recompute(self, phase: Phase) -> None:
        recompute = phase.recompute_activations if phase.recompute_activations is not None \
            else self.args.recompute_activations
        # Read by Megatron's TransformerBlock at every forward: switching per phase is safe.
        # With DUS skips, DusTransformerBlock checkpoints layer by layer and applies the skips
        # between the checkpoints (megatron_jai/model/dus_block.py).
        self.tcfg.recompute_granularity = "full" if recompute else None
        self.tcfg.recompute_method = "uniform" if recompute else None
        self.tcfg.recompute_num_layers = 1 if recompute else None

    def _set_rope(self, phase: Phase) -> None:
        c = self.model.jai_config
        changed = apply_rope(self.model, phase.rotary_base or c.rotary_base,
                             phase.rotary_interpolation_factor
                             if phase.rotary_interpolation_factor is not None
                             else c.rotary_interpolation_factor)
        if changed:
            c = self.model.jai_config
            self._print(f"phase {phase.name}: RoPE base {c.rotary_base:g}, position interpolation "
                        f"{c.rotary_interpolation_factor or 1:g}")

    # == one step ===============================================================================
    def global_batch(self, data_iter, num_micro: int) -> tuple:
        """This rank's micro-batches of the next step (on the device) and the loss scale that
        turns their loss sums into the mean over the whole global batch."""
        from megatron.core import parallel_state as ps

        batches, units = [], 0
        for _ in range(num_micro):
            batch = next(data_iter)
            top = int(batch["tokens"].max())  # on the host, before the copy: no device sync
            if top >= self.cfg.vocab_size:
                raise TrainingError(f"token id {top} in the data is outside the model vocabulary "
                                    f"({self.cfg.vocab_size} ids)", rank_specific=True)
            units += self.objective.units(batch)
            batches.append({k: v.to(self.device, non_blocking=True) for k, v in batch.items()})
        total = torch.tensor(float(units), dtype=torch.float32, device=self.device)
        dist.all_reduce(total, group=ps.get_data_parallel_group())
        # A device tensor: no host synchronisation (no units at all: every loss sum is 0 anyway).
        return batches, num_micro * self.dp / total.clamp(min=1.0)

    def run_schedule(self, model, batches: list, run: PhaseRun, scale: float,
                     forward_only: bool, inject_nan: bool = False,
                     labels: Optional[tuple] = None) -> list:
        """Megatron's forward(-backward) schedule over ``batches`` with the objective's loss;
        ``labels``: the datasets of the batches' blend (default the phase's training blend)."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        objective = self.objective
        labels = run.labels if labels is None else labels

        def forward_step(data_iter, chunk):
            batch = next(data_iter)
            output, loss_terms = objective.forward(chunk, batch, labels)
            return output, make_loss_func(loss_terms, scale, inject_nan)

        return get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter(batches), model=[model],
            num_microbatches=len(batches), seq_length=run.phase.seq_length,
            micro_batch_size=run.mbs * objective.sequences_per_sample,
            forward_only=forward_only)

    def reduce_stats(self, losses: list, n_stats: int, flag: bool = False) -> tuple:
        """Sum the objective's statistics of the last stage over micro-batches and DP (one
        all-reduce over the world), together with a flag (pre-emption) of every rank."""
        from megatron.core import parallel_state as ps

        stats = torch.zeros(n_stats + 1, dtype=torch.float64, device=self.device)
        if ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0:
            for entry in losses:
                stats[:-1] += entry["stats"].to(torch.float64)
        stats[-1] = float(flag)
        dist.all_reduce(stats)
        return stats[:-1].cpu(), bool(stats[-1] > 0)

    def train_step(self, run: PhaseRun, preemption: PreemptionHandler) -> StepResult:
        """Forward, backward and optimizer update of one global batch."""
        step = self.state.iteration + 1
        t0 = time.perf_counter()
        batches, scale = self.global_batch(run.data_iter, run.num_micro)
        batches = self.objective.prepare_batches(self.context, batches, run)
        self.ddp_model.zero_grad_buffer()
        self.optimizer.zero_grad()
        losses = self.run_schedule(self.ddp_model, batches, run, scale, forward_only=False,
                                   inject_nan=step in self._inject)
        stats, preempted = self.reduce_stats(losses, len(run.stat_names), preemption.requested)
        metrics = self.objective.summarize(sums_by_name(stats, run.stat_names), run.labels)
        lr = self.optimizer.param_groups[0]["lr"]  # the rate this step's update uses
        updated, grad_norm = optimizer_step(self.optimizer, self.args.clip_grad,
                                            math.isfinite(metrics["loss"]))
        if updated:
            run.scheduler.step(increment=1)
            if self.cfg.is_moe:
                from megatron_jai.moe.layer import update_expert_biases

                update_expert_biases(self.model)
        if self.on_gpu:  # the optimizer step's kernels belong to this step's time
            torch.cuda.synchronize()
        return StepResult(step, lr, grad_norm, updated, time.perf_counter() - t0, preempted,
                          metrics)

    def advance(self, run: PhaseRun, result: StepResult) -> None:
        """Count the step in the training state (what the next checkpoint records)."""
        state = self.state
        state.iteration = result.step
        state.phase_step += 1
        state.phase_consumed_samples += run.gbs
        state.consumed_tokens += run.tokens_per_step
        self.skips.record(not result.updated)
        state.skipped_steps = self.skips.total
        state.scheduler = run.scheduler.state_dict()
        state.phase_name = run.phase.name
        if state.phase_step == run.iters:  # phase done: the checkpoint starts the next
            state.finish_phase(run.phase.name, run.scheduler.state_dict())

    def step_record(self, run: PhaseRun, result: StepResult) -> dict:
        record = {"step": result.step, "phase": run.phase.name, **result.metrics,
                  "lr": result.lr, "grad_norm": result.grad_norm,
                  **throughput(run.tokens_per_step, result.elapsed,
                               self.cfg.flops_per_token(run.phase.seq_length), self.world,
                               self.args.peak_tflops),
                  "skipped": not result.updated, "skipped_total": self.skips.total,
                  "seq_length": run.phase.seq_length, "global_batch_size": run.gbs,
                  "consumed_tokens": self.state.consumed_tokens, "step_time_s": result.elapsed}
        if self.cfg.is_moe:
            from megatron_jai.training.router_metrics import global_router_metrics

            record.update(global_router_metrics(self.model, self.cfg, self.device))
        return record

    def evaluate(self, run: PhaseRun) -> dict:
        """Validation metrics on the phase's validation data: the same first ``--eval-iters``
        global batches every time, in eval mode (``valid_loss``: inference skip alphas, as the
        exported model runs). Models whose skips train with other alphas also get
        ``valid_loss_train_alphas``, comparable with the training loss."""
        from megatron_jai.model.dus_block import skip_alphas

        args = self.args
        out = {}
        phase = run.phase
        labels = phase.valid_dataset_names or tuple(f"valid{i}"
                                                    for i in range(len(phase.valid_blend)))
        names = self.objective.stat_names(labels)
        self.ddp_model.eval()
        try:
            for suffix, alphas in self.objective.validation_modes(self.cfg):
                it = data_iterator(run.valid_ds, 0, min(len(run.valid_ds), args.eval_iters * run.gbs),
                                   run.mbs, self.dp_rank, self.dp, 0, self.objective.collate)
                total = torch.zeros(len(names), dtype=torch.float64)
                with torch.no_grad(), skip_alphas(self.model, alphas):
                    for _ in range(args.eval_iters):
                        try:
                            batches, scale = self.global_batch(it, run.num_micro)
                        except StopIteration:
                            break
                        batches = self.objective.prepare_batches(self.context, batches, run)
                        losses = self.run_schedule(self.ddp_model, batches, run, scale,
                                                   forward_only=True, labels=labels)
                        total += self.reduce_stats(losses, len(names))[0]
                metrics = self.objective.summarize(sums_by_name(total, names), labels)
                out.update({f"valid_{k}{suffix}": v for k, v in metrics.items()})
        finally:
            self.ddp_model.train()
            if self.cfg.is_moe:  # evaluation's routing is not the next step's statistics
                from megatron_jai.moe.layer import collect_router_stats

                collect_router_stats(self.model)
        return out

    # == the loop ===============================================================================
    def evaluate_only(self) -> dict:
        """``--eval-only``: every phase's validation metrics of the model as loaded."""
        from megatron_jai.training.data_loading import check_validation

        check_validation(self.phases, 1)
        results = {}
        for index, phase in enumerate(self.phases):
            run = self.enter_phase(index)
            if run is None:
                continue
            metrics = self.evaluate(run)
            results[phase.name] = metrics
            self.metrics.log({"step": self.state.iteration, "phase": phase.name,
                              "eval_only": True, **metrics}, print_line=False)
            self._print(f"eval {phase.name} at iteration {self.state.iteration}: " + ", ".join(
                f"{k} {v:.4f}" for k, v in metrics.items()))
        self.metrics.close()
        return results

    def train(self) -> RunSummary:
        args, state = self.args, self.state
        summary = RunSummary(skipped=state.skipped_steps)
        self.preemption = PreemptionHandler()
        self._inject = set(args.inject_nan_at_step or ())
        self._rate = [0, 0.0]  # tokens, seconds (after the first step: warm-up costs)
        stop = False
        try:
            while state.phase_index < len(self.phases) and not stop:
                run = self.enter_phase(state.phase_index)
                if run is None:
                    continue
                self._announce(run)
                self.ddp_model.train()
                while not stop and state.phase_index == run.index:
                    result = self.train_step(run, self.preemption)
                    self.advance(run, result)
                    record = self.step_record(run, result)
                    if args.eval_interval and run.valid_ds is not None and \
                            result.step % args.eval_interval == 0:
                        record.update(self.evaluate(run))
                    self.metrics.log(record)
                    self.skips.check(result.step)
                    self._count(summary, run, result)
                    stop = self.after_step(run, result, summary)
        finally:
            self.preemption.restore()
            self.metrics.close()
        summary.skipped = state.skipped_steps
        summary.tokens_per_s = self._rate[0] / self._rate[1] if self._rate[1] else 0.0
        return summary

    def _announce(self, run: PhaseRun) -> None:
        state = self.state
        self._print(f"phase {run.index + 1}/{len(self.phases)} {run.phase.name}: {run.iters} "
                    f"steps of {run.gbs} x {run.phase.seq_length} tokens, blend "
                    + ", ".join(f"{lab} {w:.1%}" for lab, (w, _) in zip(run.labels, run.phase.blend))
                    + (f", from step {state.phase_step}" if state.phase_step else ""))

    def _count(self, summary: RunSummary, run: PhaseRun, result: StepResult) -> None:
        loss = result.metrics["loss"]
        if summary.first_loss is None:
            summary.first_loss = loss
        summary.last_loss, summary.steps = loss, summary.steps + 1
        if summary.steps > 1:
            self._rate[0] += run.tokens_per_step
            self._rate[1] += result.elapsed

    def after_step(self, run: PhaseRun, result: StepResult, summary: RunSummary) -> bool:
        """Save when due; True when the run stops here."""
        args, state, step = self.args, self.state, result.step
        testing_exit = args.exit_after_step is not None and step >= args.exit_after_step
        capped = bool(args.phases) and args.train_iters is not None and step >= args.train_iters
        periodic = args.save_interval and step % args.save_interval == 0
        phase_end = state.phase_step == 0
        last = state.phase_index >= len(self.phases)
        preempted = result.preempted
        if args.save and (preempted or testing_exit or capped or periodic or phase_end or last):
            summary.checkpoint = self.save()
            if not preempted and self._signal_during_save():
                # The checkpoint just written is current: stop without a second one.
                self._print(f"SIGTERM received while saving step {step}: stopped, checkpoint "
                            f"{summary.checkpoint}")
                summary.preempted = True
                return True
        if capped:
            self._print(f"--train-iters {args.train_iters} reached: stopped after step {step} "
                        f"(phase {run.phase.name})")
            return True
        if preempted or testing_exit:
            summary.preempted = True
            self._print(f"{'SIGTERM received' if preempted else '--exit-after-step'}: stopped "
                        f"after step {step}"
                        + (f", checkpoint {summary.checkpoint}" if args.save
                           else " (no --save: nothing saved)"))
            return True
        return False

    def _signal_during_save(self) -> bool:
        flag = torch.tensor([float(self.preemption.requested)], device=self.device)
        dist.all_reduce(flag)
        return bool(flag.item() > 0)

    def save(self) -> str:
        args = self.args
        hook = testing_save_hook(args, self.state.iteration)
        snapshot = {k: v for k, v in vars(args).items() if k != "phases"}
        snapshot["phases"] = [asdict(p) for p in self.phases]
        path = checkpointing.save(
            args.save, self.model, self.optimizer, self.state, args.keep_last,
            args_snapshot=_plain(snapshot), before_commit=hook, tokenizer=args.tokenizer,
            protect=self.resume_iteration, stale=self._stale_iterations)
        self._stale_iterations = []
        return path


def apply_device_defaults(args, on_gpu: bool) -> None:
    """GPU/CPU defaults of precision, optimizer, loader workers and MFU peak; refuses what
    Megatron-Core cannot do on CPU."""
    if args.bf16 is None:
        args.bf16 = on_gpu
    if args.use_distributed_optimizer is None:
        args.use_distributed_optimizer = on_gpu
    if args.bf16 and not on_gpu:
        raise TrainingError("--bf16 needs CUDA (Megatron-Core's mixed-precision optimizer "
                            "checks for CUDA tensors); CPU runs are fp32")
    if args.use_distributed_optimizer and not on_gpu:
        raise TrainingError("the distributed optimizer needs CUDA (Megatron-Core checks for "
                            "CUDA tensors); use --no-distributed-optimizer on CPU")
    if args.num_workers is None:
        args.num_workers = 2 if on_gpu else 0
    if args.peak_tflops is None and on_gpu:
        args.peak_tflops = H100_BF16_PEAK_TFLOPS


def resolve_run(args) -> tuple:
    """``(resuming, model_config, note)``: whether ``--load`` resumes, and the architecture the
    run trains (the checkpoint's when resuming, incl. RoPE changes of its phases). Raises
    :class:`TrainingError` for a ``--load`` that names nothing to resume."""
    from megatron_jai.presets import load_model_config

    note = None
    if args.load and args.load_iteration is not None:
        # The named iteration is what counts (the tracker may be the thing being worked around).
        resuming = os.path.isdir(checkpointing.dist_ckpt.iteration_dir(args.load,
                                                                       args.load_iteration))
        if not resuming:
            raise TrainingError(f"--load {args.load} --load-iteration {args.load_iteration}: no "
                                f"such checkpoint (complete iterations: "
                                f"{checkpointing.complete_iterations(args.load) or 'none'})")
    else:
        resuming = checkpointing.has_checkpoint(args.load)
    if args.load and not resuming:
        # --load == --save is the requeue pattern (the first run finds nothing); anything else
        # naming an empty place is a mistake, not a reason to start from scratch silently.
        same_as_save = bool(args.save) and os.path.abspath(args.save) == os.path.abspath(args.load)
        if args.load_iteration is not None or not same_as_save:
            raise TrainingError(f"--load {args.load}: no complete checkpoint there (no "
                                f"{checkpointing.dist_ckpt.TRACKER_FILE})")
        note = f"--load {args.load}: no checkpoint yet, starting a new run"
    try:
        if resuming:
            cfg = checkpointing.saved_model_config(args.load, args.load_iteration)
        else:
            cfg = load_model_config(args.model or args.init_from or "tiny")
    except (ValueError, OSError) as err:
        raise TrainingError(str(err)) from None
    return resuming, cfg, note


def _plain(obj):
    """Only plain python values (the checkpoint's common part is pickled)."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return str(obj)


def run(args, objective: Optional[Objective] = None) -> int:
    """Set up, train all phases, print the summary. Returns the exit code."""
    from megatron_jai import parallel

    trainer = Trainer(args, objective)
    try:
        trainer.setup()
        if not trainer.objective.trains:
            return 0
        if args.eval_only:
            trainer.evaluate_only()
            return 0
        if trainer.state.phase_index >= len(trainer.phases):
            trainer._print(
                f"training already complete at iteration {trainer.state.iteration} ({args.load}: "
                f"all {len(trainer.phases)} phase(s) done); to train longer, raise --train-iters / "
                f"--train-tokens (or the last phase's budget in the config)")
            return 0
        s = trainer.train()
        ckpt = s.checkpoint or "none (no --save)"
        trainer._print(
            f"summary: {s.steps} steps to iteration {trainer.state.iteration}, loss "
            f"{_f(s.first_loss)} -> {_f(s.last_loss)}, {s.tokens_per_s:,.0f} tokens/s, "
            f"skipped steps {s.skipped}, checkpoint {ckpt}"
            + (" (pre-empted)" if s.preempted else ""))
        return 0
    finally:
        trainer.release()
        parallel.destroy()


def _f(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{x:.4f}"
