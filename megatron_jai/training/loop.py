"""The pretraining program behind ``pretrain_jai.py``, on Megatron-Core's training pieces.

* model: :func:`megatron_jai.model.build_model` (this rank's pipeline stage), ``Float16Module`` for
  bf16, Megatron-Core ``DistributedDataParallel`` (gradient buffers, DP all-reduce);
* optimizer: ``get_megatron_optimizer`` (Adam; the distributed optimizer on GPU, the plain one on
  CPU where Megatron-Core's distributed optimizer insists on CUDA tensors) and
  ``OptimizerParamScheduler`` (warm-up + cosine decay, one schedule per phase);
* schedules: ``get_forward_backward_func`` (1F1B for PP > 1);
* data: :func:`megatron_jai.data.datasets.build_datasets` (GPTDataset / BlendedDataset), read in a
  fixed global order from the phase's consumed-sample count, so resuming is exact;
* checkpoints: :mod:`megatron_jai.training.checkpointing`; faults: :mod:`~.faults`; metrics:
  :mod:`~.metrics`; phases: :mod:`~.phases`.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass
from functools import partial
from typing import Optional

import torch
import torch.distributed as dist

from megatron_jai.training import checkpointing
from megatron_jai.training.arguments import flag_phase
from megatron_jai.training.checkpointing import TrainState
from megatron_jai.training.faults import PreemptionHandler, SkipTracker, TrainingError
from megatron_jai.training.metrics import H100_BF16_PEAK_TFLOPS, MetricsLogger, throughput
from megatron_jai.training.phases import Phase, apply_rope

DEMO_RUN_DIR = "runs/tiny_demo"


# ---- data ----------------------------------------------------------------------------------
class MicroBatchSampler:
    """Sample indices of this DP rank's micro-batches, in a global order fixed by the dataset.

    Step ``k`` of a phase uses samples ``[k*G, (k+1)*G)`` (``G`` = global batch); micro-batch ``m``
    of DP rank ``r`` takes ``mbs`` of them at ``k*G + m*mbs*dp + r*mbs``. Starting at
    ``consumed`` resumes exactly; a different DP size reads the same samples per step.
    """

    def __init__(self, total: int, consumed: int, micro_batch_size: int, dp_rank: int,
                 dp_size: int):
        self.total, self.consumed = total, consumed
        self.mbs, self.dp_rank, self.dp_size = micro_batch_size, dp_rank, dp_size

    def __len__(self):
        return max(0, (self.total - self.consumed) // (self.mbs * self.dp_size))

    def __iter__(self):
        stride = self.mbs * self.dp_size
        for start in range(self.consumed, self.total - stride + 1, stride):
            first = start + self.dp_rank * self.mbs
            yield list(range(first, first + self.mbs))


def _collate(items: list) -> dict:
    out = {}
    for key in ("tokens", "labels", "loss_mask", "position_ids"):
        out[key] = torch.stack([torch.as_tensor(item[key]) for item in items])
    out["dataset_id"] = torch.tensor([int(item.get("dataset_id", 0)) for item in items])
    return out


def _ignore_sigterm(worker_id: int) -> None:
    # Slurm signals every process of the job step: loader workers must outlive the main process's
    # pre-emption checkpoint instead of dying and failing the next fetch.
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def data_iterator(dataset, consumed: int, total: int, mbs: int, dp_rank: int, dp_size: int,
                  num_workers: int):
    sampler = MicroBatchSampler(total, consumed, mbs, dp_rank, dp_size)
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, collate_fn=_collate, num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        worker_init_fn=_ignore_sigterm if num_workers else None)
    return iter(loader)


def check_vocabulary(cfg, phases: list[Phase], tokenizer_path: Optional[str]) -> None:
    """Refuse a tokenizer or dataset whose token ids do not fit the model's vocabulary."""
    from megatron_jai.data.datasets import max_token_id
    from megatron_jai.data.preprocess import output_paths, read_meta

    if tokenizer_path:
        from megatron_jai.data.tokenizer import load_tokenizer

        try:
            tok = load_tokenizer(tokenizer_path)
        except ValueError as err:
            raise TrainingError(str(err)) from None
        if tok.vocab_size > cfg.vocab_size:
            raise TrainingError(f"tokenizer {tokenizer_path} has {tok.vocab_size} ids but model "
                                f"{cfg.name!r} only {cfg.vocab_size} embedding rows")
    seen = set()
    for phase in phases:
        for _, prefix in phase.blend:
            if prefix in seen:
                continue
            seen.add(prefix)
            if not os.path.isfile(output_paths(prefix)[0]):
                raise TrainingError(f"dataset {prefix!r}: missing {prefix}.bin/.idx (make it with "
                                    f"tools/preprocess_data.py)")
            meta = read_meta(prefix)
            if meta is not None:
                ids, what = meta["vocab_size"], f"was tokenized with a {meta['vocab_size']}-id " \
                                                f"vocabulary ({meta.get('tokenizer')})"
                top = ids - 1
            else:
                top = max_token_id(prefix)
                what = f"holds token id {top}"
            if top >= cfg.vocab_size:
                raise TrainingError(f"dataset {prefix!r} {what}, but model {cfg.name!r} has only "
                                    f"{cfg.vocab_size} embedding rows (ids 0..{cfg.vocab_size - 1})")


# ---- the trainer ---------------------------------------------------------------------------
@dataclass
class RunSummary:
    steps: int = 0
    first_loss: Optional[float] = None
    last_loss: Optional[float] = None
    tokens_per_s: float = 0.0
    skipped: int = 0
    checkpoint: Optional[str] = None
    preempted: bool = False


class Trainer:
    def __init__(self, args):
        self.args = args
        self.on_gpu = torch.cuda.is_available()
        self.device = torch.device("cpu")  # this rank's GPU is known after parallel.initialize

    # -- setup --------------------------------------------------------------------------------
    def setup(self) -> None:
        from megatron.core import parallel_state as ps

        from megatron_jai import parallel
        from megatron_jai.config import load_model_config, pipeline_stage_layers

        args = self.args
        if args.bf16 is None:
            args.bf16 = self.on_gpu
        if args.use_distributed_optimizer is None:
            args.use_distributed_optimizer = self.on_gpu
        if args.bf16 and not self.on_gpu:
            raise TrainingError("--bf16 needs CUDA (Megatron-Core's mixed-precision optimizer "
                                "checks for CUDA tensors); CPU runs are fp32")
        if args.use_distributed_optimizer and not self.on_gpu:
            raise TrainingError("the distributed optimizer needs CUDA (Megatron-Core checks for "
                                "CUDA tensors); use --no-distributed-optimizer on CPU")
        if args.num_workers is None:
            args.num_workers = 2 if self.on_gpu else 0
        if args.peak_tflops is None and self.on_gpu:
            args.peak_tflops = H100_BF16_PEAK_TFLOPS
        try:
            parallel.initialize(args.tp, args.pp, args.ep, seed=args.seed)
        except ValueError as err:
            raise TrainingError(str(err)) from None
        if self.on_gpu:  # initialize() selected this rank's GPU (LOCAL_RANK)
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()
        self.dp = ps.get_data_parallel_world_size()
        self.dp_rank = ps.get_data_parallel_rank()
        if args.dp is not None and args.dp != self.dp:
            raise TrainingError(f"--dp {args.dp} does not match world size {self.world} / "
                                f"(TP {args.tp} * PP {args.pp}) = {self.dp}")
        if args.no_arguments:
            args.save = args.save or os.path.join(DEMO_RUN_DIR, "checkpoints")
            args.metrics_file = args.metrics_file or os.path.join(DEMO_RUN_DIR, "metrics.jsonl")
            args.overwrite_save = True

        self.resuming = checkpointing.has_checkpoint(args.load)
        if args.load and not self.resuming:
            # --load == --save is the requeue pattern (the first run finds nothing); anything else
            # naming an empty place is a mistake, not a reason to start from scratch silently.
            same_as_save = bool(args.save) and os.path.abspath(args.save) == \
                os.path.abspath(args.load)
            if args.load_iteration is not None or not same_as_save:
                raise TrainingError(f"--load {args.load}: no complete checkpoint there (no "
                                    f"{checkpointing.dist_ckpt.TRACKER_FILE})")
            self._print(f"--load {args.load}: no checkpoint yet, starting a new run")
        # Resuming: the checkpoint's architecture is the truth (incl. RoPE changes of phases).
        try:
            if self.resuming:
                self.cfg = checkpointing.saved_model_config(args.load, args.load_iteration)
            else:
                self.cfg = load_model_config(args.model or args.init_from or "tiny")
        except (ValueError, OSError) as err:
            raise TrainingError(str(err)) from None
        self._prepare_save_dir()

        self.phases = args.phases or [flag_phase(args, self._demo_data())]
        error = None
        if self.rank == 0:
            try:
                check_vocabulary(self.cfg, self.phases, args.tokenizer)
            except TrainingError as err:
                error = str(err)
        self._sync_errors(error)
        self._build_model_and_optimizer()

        self.state = TrainState()
        rng_note = ""
        if self.resuming:
            self.state, rng_ok = checkpointing.load(args.load, self.model, self.optimizer,
                                                    iteration=args.load_iteration)
            rng_note = "" if rng_ok else (f" (layout changed from {self.state.layout}: RNG "
                                          f"states re-seeded)")
            self._print(f"resumed from {args.load} at iteration {self.state.iteration} "
                        f"(phase {self.state.phase_index + 1}, step {self.state.phase_step}){rng_note}")
        elif args.init_from:
            it = checkpointing.load_model_weights(args.init_from, self.model)
            self.optimizer.reload_model_params()
            self._print(f"initialised model weights from {args.init_from} (iteration {it})")
        self.skips = SkipTracker(args.max_skipped_steps, total=self.state.skipped_steps)
        self.metrics = MetricsLogger(
            self.rank == 0, args.log_interval, args.metrics_file, args.tensorboard_dir,
            resume_step=self.state.iteration if self.resuming else 0)
        counts = self.cfg.parameter_counts()
        split = ""
        if args.first_stage_layers is not None or args.last_stage_layers is not None:
            split = " (stage layers " + "+".join(map(str, pipeline_stage_layers(
                self.cfg.num_layers, args.pp, args.first_stage_layers, args.last_stage_layers))) + ")"
        self._print(f"model {self.cfg.name}: {counts['total'] / 1e6:.2f}M parameters "
                    f"({counts['active'] / 1e6:.2f}M active), layout TP={args.tp} PP={args.pp}{split} "
                    f"EP={args.ep} DP={self.dp}, {'bf16' if args.bf16 else 'fp32'}, "
                    f"{'distributed' if args.use_distributed_optimizer else 'plain'} optimizer, "
                    f"{len(self.phases)} phase(s): "
                    + ", ".join(f"{p.name} ({p.seq_length} tokens x {self._gbs(p)})"
                                for p in self.phases))

    def _prepare_save_dir(self) -> None:
        args = self.args
        if not args.save or (self.resuming and os.path.abspath(args.save) ==
                             os.path.abspath(args.load)):
            return
        occupied = bool(checkpointing.complete_iterations(args.save)
                        or checkpointing.has_checkpoint(args.save))
        dist.barrier()  # every rank has looked before rank 0 may delete
        if not occupied:
            return
        if not args.overwrite_save:
            raise TrainingError(f"--save {args.save} already holds checkpoints of another run; "
                                f"resume with --load {args.save}, or pass --overwrite-save")
        if self.rank == 0:
            import shutil

            for name in os.listdir(args.save):
                if name.startswith("iter_") or name.startswith(
                        checkpointing.dist_ckpt.TRACKER_FILE):
                    path = os.path.join(args.save, name)
                    shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
        dist.barrier()

    def _demo_data(self) -> Optional[str]:
        """The demo corpus when no data was given (built once; safe from every rank at once)."""
        if self.args.data_path or self.args.phases:
            return None
        from megatron_jai.data.demo import ensure_demo_data

        demo = ensure_demo_data(self.args.data_cache_dir, log=print if self.rank == 0 else None)
        self.args.tokenizer = self.args.tokenizer or demo.tokenizer_path
        return demo.data_prefix

    def _sync_errors(self, error: Optional[str]) -> None:
        """Rank 0 validated: every rank raises its error (one line from rank 0, exit 2 everywhere)
        instead of the others dying in a collective with a traceback."""
        message = [error]
        dist.broadcast_object_list(message, src=0)
        if message[0] is not None:
            raise TrainingError(message[0])

    def _gbs(self, phase: Phase) -> int:
        return phase.global_batch_size or self.args.global_batch_size

    def _mbs(self, phase: Phase) -> int:
        return phase.micro_batch_size or self.args.micro_batch_size

    def _build_model_and_optimizer(self) -> None:
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.distributed import finalize_model_grads
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.transformer.module import Float16Module

        from megatron_jai.model import build_model

        args = self.args
        dtype = torch.bfloat16 if args.bf16 else torch.float32
        overrides = {}
        max_seq = max(p.seq_length for p in self.phases)
        if max_seq > self.cfg.max_position_embeddings:
            self.cfg = self.cfg.replace(max_position_embeddings=max_seq)
        try:
            tcfg = self.cfg.transformer_config(tp=args.tp, pp=args.pp, ep=args.ep,
                                               params_dtype=dtype,
                                               sequence_parallel=args.sequence_parallel,
                                               first_stage_layers=args.first_stage_layers,
                                               last_stage_layers=args.last_stage_layers,
                                               **overrides)
        except ValueError as err:
            raise TrainingError(str(err)) from None
        self.model = build_model(self.cfg, tcfg)  # this rank's stage; .jai_config lives here
        wrapped = Float16Module(tcfg, self.model) if args.bf16 else self.model
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            use_distributed_optimizer=args.use_distributed_optimizer,
            overlap_grad_reduce=False, overlap_param_gather=False)
        self.ddp_model = DistributedDataParallel(tcfg, ddp_config, wrapped)
        opt_config = OptimizerConfig(
            optimizer="adam", lr=args.lr, min_lr=args.min_lr, weight_decay=args.weight_decay,
            adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2, adam_eps=args.adam_eps,
            clip_grad=args.clip_grad, bf16=args.bf16, params_dtype=dtype,
            use_distributed_optimizer=args.use_distributed_optimizer)
        self.optimizer = get_megatron_optimizer(opt_config, [self.ddp_model])
        tcfg.no_sync_func = self.ddp_model.no_sync
        tcfg.finalize_model_grads_func = finalize_model_grads
        tcfg.grad_scale_func = self.optimizer.scale_loss
        self.tcfg = tcfg

    def _print(self, msg: str) -> None:
        if self.rank == 0:
            print(msg, flush=True)

    # -- one phase ----------------------------------------------------------------------------
    def _enter_phase(self, index: int):
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        from megatron_jai.data.datasets import build_datasets

        args, phase = self.args, self.phases[index]
        gbs, mbs = self._gbs(phase), self._mbs(phase)
        if gbs % (mbs * self.dp):
            raise TrainingError(f"phase {phase.name}: global batch {gbs} is not a multiple of "
                                f"micro batch {mbs} x DP {self.dp}")
        iters = phase.iterations(gbs)
        recompute = phase.recompute_activations if phase.recompute_activations is not None \
            else args.recompute_activations
        # Read by Megatron's TransformerBlock at every forward: switching per phase is safe.
        # With DUS skips, DusTransformerBlock checkpoints layer by layer and applies the skips
        # between the checkpoints (megatron_jai/model/dus_block.py).
        self.tcfg.recompute_granularity = "full" if recompute else None
        self.tcfg.recompute_method = "uniform" if recompute else None
        self.tcfg.recompute_num_layers = 1 if recompute else None
        changed = apply_rope(self.model, phase.rotary_base or self.model.jai_config.rotary_base,
                             phase.rotary_interpolation_factor
                             if phase.rotary_interpolation_factor is not None
                             else self.model.jai_config.rotary_interpolation_factor)
        if changed:
            c = self.model.jai_config
            self._print(f"phase {phase.name}: RoPE base {c.rotary_base:g}, position interpolation "
                        f"{c.rotary_interpolation_factor or 1:g}")
        # Every evaluation reads the same first eval_iters global batches of the validation split.
        eval_samples = args.eval_iters * gbs if args.eval_interval else None
        try:
            train_ds, valid_ds = build_datasets(
                [(w, p) for w, p in phase.blend], phase.seq_length, num_samples=iters * gbs,
                seed=args.seed + index, tokenizer=args.tokenizer,
                split="98,2" if eval_samples else None, valid_num_samples=eval_samples,
                cache_dir=os.path.join(args.data_cache_dir, "dataset_index")
                if args.data_cache_dir else None)
        except ValueError as err:
            raise TrainingError(f"phase {phase.name}: {err}") from None
        lr_scale = phase.lr_scale
        max_lr = (phase.lr if phase.lr is not None else args.lr) * lr_scale
        min_lr = (phase.min_lr if phase.min_lr is not None else args.min_lr) * lr_scale
        warmup = phase.warmup_iters if phase.warmup_iters is not None else args.warmup_iters
        decay = phase.lr_decay_iters or args.lr_decay_iters or iters
        warmup = min(warmup, max(decay - 1, 0))
        scheduler = OptimizerParamScheduler(
            self.optimizer, init_lr=0.0, max_lr=max_lr, min_lr=min(min_lr, max_lr),
            lr_warmup_steps=warmup, lr_decay_steps=decay,
            lr_decay_style=phase.lr_decay_style or args.lr_decay_style,
            start_wd=args.weight_decay, end_wd=args.weight_decay, wd_incr_steps=decay,
            wd_incr_style="constant")
        # Megatron-Core's param groups carry their own max_lr/min_lr (set from OptimizerConfig),
        # which win over the scheduler's: give them this phase's.
        for group in self.optimizer.param_groups:
            group["max_lr"], group["min_lr"] = max_lr, min(min_lr, max_lr)
        if self.state.scheduler is not None and self.state.phase_index == index:
            scheduler.load_state_dict(self.state.scheduler)
        return phase, gbs, mbs, iters, train_ds, valid_ds, scheduler

    def _forward_step(self, phase: Phase, n_datasets: int, inject_nan: bool,
                      data_iter, model):
        batch = next(data_iter)
        top = int(batch["tokens"].max())  # on the host, before the copy: no device sync
        if top >= self.cfg.vocab_size:
            raise TrainingError(f"token id {top} in the data is outside the model vocabulary "
                                f"({self.cfg.vocab_size} ids)", rank_specific=True)
        tokens = batch["tokens"].to(self.device, non_blocking=True)
        labels = batch["labels"].to(self.device, non_blocking=True)
        loss_mask = batch["loss_mask"].to(self.device, non_blocking=True).float()
        positions = batch["position_ids"].to(self.device, non_blocking=True)
        dataset_id = batch["dataset_id"].to(self.device)
        output = model(tokens, positions, None, labels=labels)

        def loss_func(output_tensor):
            per_sample = (output_tensor.float() * loss_mask).sum(dim=1)
            num_tokens = loss_mask.sum()
            loss_sum = per_sample.sum()
            if inject_nan:
                loss_sum = loss_sum * float("nan")
            per_ds = torch.zeros(2 * n_datasets, device=loss_sum.device)
            per_ds[:n_datasets].index_add_(0, dataset_id, per_sample.detach())
            per_ds[n_datasets:].index_add_(0, dataset_id, loss_mask.sum(dim=1))
            stats = torch.cat([torch.stack([loss_sum.detach(), num_tokens]), per_ds])
            # The schedule divides the returned loss in place: report a clone.
            return loss_sum, num_tokens.clone().detach().to(torch.int), {"stats": stats.clone()}

        return output, loss_func

    def _reduce_stats(self, losses: list, n_datasets: int, preempt: bool) -> torch.Tensor:
        """Sum the loss statistics of the last stage over DP (one all-reduce over the world),
        together with the pre-emption flag of every rank."""
        from megatron.core import parallel_state as ps

        stats = torch.zeros(2 + 2 * n_datasets + 1, dtype=torch.float64, device=self.device)
        if ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0:
            for entry in losses:
                stats[:-1] += entry["stats"].to(torch.float64)
        stats[-1] = float(preempt)
        dist.all_reduce(stats)
        return stats

    def _optimizer_step(self, loss_finite: bool) -> tuple[bool, float]:
        """Megatron's optimizer step, split so a non-finite loss or gradient skips the update."""
        found_inf = self.optimizer.prepare_grads()
        grad_norm = float(self.optimizer.get_grad_norm())
        if found_inf or not loss_finite or not math.isfinite(grad_norm):
            return False, grad_norm
        clip = self.args.clip_grad
        if clip > 0 and grad_norm > clip:
            # (Megatron-Core's clip_grad_by_total_norm_fp32 asserts CUDA tensors: scale directly.)
            # (MoE models get a ChainedOptimizer: dense and expert parameters; it has no
            # get_parameters() of its own when it chains several.)
            optimizers = getattr(self.optimizer, "chained_optimizers", [self.optimizer])
            grads = [p.grad for o in optimizers for p in o.get_parameters() if p.grad is not None]
            torch._foreach_mul_(grads, clip / (grad_norm + 1e-6))
        self.optimizer.step_with_ready_grads()
        return True, grad_norm

    def _evaluate(self, valid_ds, phase: Phase, gbs: int, mbs: int, n_datasets: int) -> float:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        self.ddp_model.eval()
        it = data_iterator(valid_ds, 0, min(len(valid_ds), self.args.eval_iters * gbs), mbs,
                          self.dp_rank, self.dp, 0)
        total = torch.zeros(2, dtype=torch.float64, device=self.device)
        with torch.no_grad():
            for _ in range(self.args.eval_iters):
                try:
                    losses = get_forward_backward_func()(
                        forward_step_func=partial(self._forward_step, phase, n_datasets, False),
                        data_iterator=it, model=[self.ddp_model],
                        num_microbatches=gbs // (mbs * self.dp), seq_length=phase.seq_length,
                        micro_batch_size=mbs, forward_only=True)
                except StopIteration:
                    break
                total += self._reduce_stats(losses, n_datasets, False)[:2]
        self.ddp_model.train()
        return float(total[0] / total[1]) if total[1] > 0 else float("nan")

    # -- the loop -----------------------------------------------------------------------------
    def train(self) -> RunSummary:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        args, state = self.args, self.state
        summary = RunSummary(skipped=state.skipped_steps)
        preemption = PreemptionHandler()
        forward_backward = get_forward_backward_func()
        inject = set(args.inject_nan_at_step or ())
        rate_tokens, rate_time = 0, 0.0
        stop = False
        try:
            while state.phase_index < len(self.phases) and not stop:
                phase, gbs, mbs, iters, train_ds, valid_ds, scheduler = \
                    self._enter_phase(state.phase_index)
                if state.phase_step >= iters:  # the config now gives this phase fewer steps
                    self._print(f"phase {phase.name}: already {state.phase_step} of {iters} steps "
                                f"done; next phase")
                    state.phase_index += 1
                    state.phase_step = state.phase_consumed_samples = 0
                    state.scheduler = None
                    continue
                n_ds = len(phase.blend)
                labels = phase.dataset_names or tuple(f"ds{i}" for i in range(n_ds))
                num_micro = gbs // (mbs * self.dp)
                data_iter = data_iterator(train_ds, state.phase_consumed_samples, iters * gbs, mbs,
                                          self.dp_rank, self.dp, args.num_workers)
                self._print(f"phase {state.phase_index + 1}/{len(self.phases)} {phase.name}: "
                            f"{iters} steps of {gbs} x {phase.seq_length} tokens, blend "
                            + ", ".join(f"{lab} {w:.1%}" for lab, (w, _) in zip(labels, phase.blend))
                            + (f", from step {state.phase_step}" if state.phase_step else ""))
                self.ddp_model.train()
                while state.phase_step < iters:
                    step = state.iteration + 1
                    t0 = time.perf_counter()
                    self.ddp_model.zero_grad_buffer()
                    self.optimizer.zero_grad()
                    losses = forward_backward(
                        forward_step_func=partial(self._forward_step, phase, n_ds, step in inject),
                        data_iterator=data_iter, model=[self.ddp_model],
                        num_microbatches=num_micro, seq_length=phase.seq_length,
                        micro_batch_size=mbs, forward_only=False)
                    stats = self._reduce_stats(losses, n_ds, preemption.requested)
                    loss = float(stats[0] / stats[1]) if stats[1] > 0 else float("nan")
                    updated, grad_norm = self._optimizer_step(math.isfinite(loss))
                    if updated:
                        scheduler.step(increment=1)
                        if self.cfg.is_moe:
                            from megatron_jai.moe.layer import update_expert_biases

                            update_expert_biases(self.model)
                    if self.on_gpu:  # the optimizer step's kernels belong to this step's time
                        torch.cuda.synchronize()
                    elapsed = time.perf_counter() - t0
                    tokens = gbs * phase.seq_length
                    state.iteration = step
                    state.phase_step += 1
                    state.phase_consumed_samples += gbs
                    state.consumed_tokens += tokens
                    self.skips.record(not updated)
                    state.skipped_steps = self.skips.total
                    state.scheduler = scheduler.state_dict()
                    state.phase_name = phase.name
                    record = {"step": step, "phase": phase.name, "loss": loss,
                              "lr": self.optimizer.param_groups[0]["lr"], "grad_norm": grad_norm,
                              **throughput(tokens, elapsed,
                                           self.cfg.flops_per_token(phase.seq_length),
                                           self.world, args.peak_tflops),
                              "skipped": not updated, "skipped_total": self.skips.total,
                              "seq_length": phase.seq_length, "global_batch_size": gbs,
                              "consumed_tokens": state.consumed_tokens,
                              "step_time_s": elapsed}
                    if n_ds > 1:
                        for i, lab in enumerate(labels):
                            n = float(stats[2 + n_ds + i])
                            if n > 0:
                                record[f"loss/{lab}"] = float(stats[2 + i]) / n
                    if self.cfg.is_moe:
                        from megatron_jai.moe.layer import collect_router_stats

                        record.update({k: v for k, v in collect_router_stats(self.model).items()
                                       if "/layer" not in k})
                    if args.eval_interval and valid_ds is not None and \
                            step % args.eval_interval == 0:
                        record["valid_loss"] = self._evaluate(valid_ds, phase, gbs, mbs, n_ds)
                    self.metrics.log(record)
                    self.skips.check(step)
                    if summary.first_loss is None:
                        summary.first_loss = loss
                    summary.last_loss, summary.steps = loss, summary.steps + 1
                    if summary.steps > 1:  # the first step includes warm-up costs
                        rate_tokens, rate_time = rate_tokens + tokens, rate_time + elapsed

                    if state.phase_step == iters:  # phase done: the checkpoint starts the next
                        state.phase_index += 1
                        state.phase_step = state.phase_consumed_samples = 0
                        state.scheduler = None
                    preempted = bool(stats[-1] > 0)
                    testing_exit = args.exit_after_step is not None and step >= args.exit_after_step
                    capped = bool(args.phases) and args.train_iters is not None \
                        and step >= args.train_iters
                    periodic = args.save_interval and step % args.save_interval == 0
                    phase_end = state.phase_step == 0
                    last = state.phase_index >= len(self.phases)
                    if args.save and (preempted or testing_exit or capped or periodic or phase_end
                                      or last):
                        summary.checkpoint = self._save()
                    if capped:
                        self._print(f"--train-iters {args.train_iters} reached: stopped after step "
                                    f"{step} (phase {phase.name})")
                        stop = True
                        break
                    if phase_end and not (preempted or testing_exit):
                        break
                    if preempted or testing_exit:
                        summary.preempted = True
                        self._print(f"{'SIGTERM received' if preempted else '--exit-after-step'}: "
                                    f"stopped after step {step}"
                                    + (f", checkpoint {summary.checkpoint}" if args.save
                                       else " (no --save: nothing saved)"))
                        stop = True
                        break
        finally:
            preemption.restore()
            self.metrics.close()
        summary.skipped = state.skipped_steps
        summary.tokens_per_s = rate_tokens / rate_time if rate_time else 0.0
        return summary

    def _save(self) -> str:
        args = self.args
        hook = None
        if args.kill_during_save_at_step == self.state.iteration:
            def hook(tmp_dir):
                import psutil

                # Like a node failure: this process and its helpers (dist_checkpointing's writer
                # manager) die at once, leaving the unrenamed temporary directory behind.
                print(f"TESTING: killed while saving {tmp_dir}", flush=True)
                me = psutil.Process()
                for child in me.children(recursive=True):
                    child.kill()
                me.kill()
        snapshot = {k: v for k, v in vars(args).items() if k != "phases"}
        snapshot["phases"] = [asdict(p) for p in self.phases]
        return checkpointing.save(args.save, self.model, self.optimizer, self.state,
                                  args.keep_last, args_snapshot=_plain(snapshot), before_commit=hook)


def _plain(obj):
    """Only plain python values (the checkpoint's common part is pickled)."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return str(obj)


def run(args) -> int:
    """Set up, train all phases, print the summary. Returns the exit code."""
    from megatron_jai import parallel

    trainer = Trainer(args)
    try:
        trainer.setup()
        if trainer.state.phase_index >= len(trainer.phases):
            trainer._print(f"training already complete at iteration {trainer.state.iteration} "
                           f"({args.load}); nothing to do")
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
        parallel.destroy()


def _f(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{x:.4f}"
