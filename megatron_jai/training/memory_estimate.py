"""Per-GPU memory arithmetic for a TP/PP/EP/DP layout (docs/scale_out.md quotes its output).

An estimate from first principles, not a measurement. Assumptions (Megatron-Core defaults on GPU):

* bf16 weights (2 B/param) and fp32 main gradients (4 B/param, full-size buffer even with the
  distributed optimizer);
* Adam in fp32: master weights + two moments = 12 B/param, sharded over the data-parallel ranks
  holding the same weights when the distributed optimizer is on (dense weights over DP, expert
  weights over the expert-data-parallel group EDP = world / (PP * EP * ETP));
* experts are tensor-parallel like the dense layers (ETP = TP, Megatron-Core's default);
* activations in bf16 with flash attention (no s x s scores) and sequence parallelism (TP > 1);
  per token and layer: the norm inputs, the QKV input/output, the attention output, and for every
  one of the k experts a token is routed to: the FC1 input, the FC1 output ([gate; up], 2F), the
  SwiGLU output (F) and the FC2 output; all divided by TP. Full recompute keeps only each layer's
  input plus one layer's working set; selective recompute of the MLP/MoE block (Megatron-Core
  ``recompute_granularity="selective"``, ``recompute_modules=["moe"]`` or ``["mlp"]``) keeps the
  attention activations and the block's input, plus one block's working set;
* 1F1B pipeline: the first stage holds PP micro-batches in flight (its L/PP layers each);
* the last stage holds fp32 logits and their gradient for one micro-batch (vocab / TP);
* a fixed reserve for the CUDA context, NCCL buffers and allocator fragmentation.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megatron_jai.config import ModelConfig

GiB = 2**30
RESERVE_BYTES = 6 * GiB


@dataclass
class MemoryEstimate:
    params: int  # parameters on the fullest GPU
    expert_params: int
    weights: float  # bytes
    grads: float
    optimizer: float
    activations: float
    logits: float
    reserve: float
    dp: int
    edp: int
    distributed_optimizer: bool = True

    @property
    def total(self) -> float:
        return (self.weights + self.grads + self.optimizer + self.activations + self.logits
                + self.reserve)

    def rows(self):
        return [("parameters on the fullest GPU", f"{self.params / 1e9:.2f} B "
                 f"({self.expert_params / 1e9:.2f} B expert)"),
                ("bf16 weights", _gib(self.weights)), ("fp32 gradients", _gib(self.grads)),
                (f"Adam states (dense / DP={self.dp}, experts / EDP={self.edp})"
                 if self.distributed_optimizer else "Adam states (not sharded)",
                 _gib(self.optimizer)),
                ("activations (fullest stage, 1F1B)", _gib(self.activations)),
                ("fp32 logits + grad (last stage only)", _gib(self.logits)),
                ("reserve (context, NCCL, fragmentation)", _gib(self.reserve)),
                ("total", _gib(self.total))]


def _gib(x: float) -> str:
    return f"{x / GiB:.1f} GiB"


def check_layout(cfg: ModelConfig, world: int, tp: int, pp: int, ep: int,
                 even: bool = True) -> None:
    """Raise ValueError when Megatron-Core cannot build this layout (``even``: the layers split
    evenly over the pipeline stages)."""
    if world % (tp * pp):
        raise ValueError(f"world size {world} is not a multiple of TP*PP = {tp * pp}")
    if even and cfg.num_layers % pp:
        raise ValueError(f"PP={pp} does not divide {cfg.num_layers} layers")
    if cfg.num_attention_heads % tp or cfg.num_query_groups % tp:
        raise ValueError(f"TP={tp} does not divide the heads ({cfg.num_attention_heads}) and "
                         f"KV heads ({cfg.num_query_groups})")
    if cfg.is_moe:
        if cfg.num_experts % ep:
            raise ValueError(f"EP={ep} does not divide {cfg.num_experts} experts")
        if (world // pp) % (tp * ep):
            raise ValueError(f"world/PP = {world // pp} is not a multiple of ETP*EP = {tp * ep} "
                             f"(experts are tensor-parallel like the dense layers)")
    elif ep != 1:
        raise ValueError("EP > 1 needs an MoE model")


def estimate_stages(cfg: ModelConfig, world: int, tp: int, pp: int, ep: int = 1,
                    seq_length: int = 4096, micro_batch_size: int = 1, recompute: str = "none",
                    distributed_optimizer: bool = True, stage_layers: Optional[list] = None,
                    num_microbatches: Optional[int] = None) -> list:
    """Memory of one GPU of every pipeline stage (a list of :class:`MemoryEstimate`).

    ``stage_layers``: decoder layers per stage (an uneven split; default even);
    ``num_microbatches``: micro-batches per step (caps the 1F1B in-flight count)."""
    from megatron_jai.parallel import pipeline_stage_layers

    check_layout(cfg, world, tp, pp, ep, even=stage_layers is None)
    if recompute not in ("none", "selective", "full"):
        raise ValueError(f"recompute must be 'none', 'selective' or 'full', got {recompute!r}")
    stage_layers = stage_layers or pipeline_stage_layers(cfg.num_layers, pp)
    h, d = cfg.hidden_size, cfg.head_dim
    q_dim, kv_dim = cfg.num_attention_heads * d, cfg.num_query_groups * d
    attention = h * q_dim * 2 + 2 * h * kv_dim
    norms = 2 * h
    router = h * cfg.num_experts if cfg.is_moe else 0
    ffn = cfg.expert_ffn_hidden_size if cfg.is_moe else cfg.ffn_hidden_size
    experts_per_layer = 3 * h * ffn * (cfg.num_experts if cfg.is_moe else 1)
    embedding = cfg.padded_vocab_size * h  # input table (first stage) or output layer (last)
    dp = world // (tp * pp)
    edp = world // (pp * ep * tp) if cfg.is_moe else dp
    k = cfg.moe_top_k if cfg.is_moe else 1
    attn_bytes = 2 * h + 2 * h + 2 * (q_dim + 2 * kv_dim) + 2 * h
    mlp_bytes = 2 * h + (2 * h if cfg.is_moe else 0) + k * (2 * h + 2 * 2 * ffn + 2 * ffn + 2 * h)
    tokens = micro_batch_size * seq_length
    per_layer = tokens * (attn_bytes + mlp_bytes) / tp
    if recompute == "none":
        stored, working = per_layer, 0.0
    elif recompute == "selective":  # the MLP/MoE block is rerun in backward, attention is kept
        stored, working = tokens * (attn_bytes + 2 * h) / tp, tokens * mlp_bytes / tp
    else:  # full: each layer's input is kept, the layer being recomputed is live
        stored, working = tokens * 2 * h / tp, per_layer
    logits_bytes = 2 * 4.0 * tokens * cfg.padded_vocab_size / tp
    bounds = [sum(stage_layers[:i]) for i in range(pp + 1)]
    out = []
    for stage, layers in enumerate(stage_layers):
        first, last = stage == 0, stage == pp - 1
        n_tables = int(first) + int(last)
        dense = layers * (attention // tp + norms + router) + n_tables * embedding // tp \
            + (h if last else 0)
        experts = layers * experts_per_layer // (ep * tp if cfg.is_moe else tp)
        params = dense + experts
        optimizer = 12.0 * (dense / dp + experts / edp) if distributed_optimizer \
            else 12.0 * params
        # 1F1B: stage s keeps (PP - s) micro-batches between forward and backward.
        in_flight = pp - stage if num_microbatches is None else min(pp - stage, num_microbatches)
        # DUS skips: saved hidden states alive on this stage (saved here or carried through).
        alive = sum(1 for sk in cfg.skip_connections
                    if sk.source < bounds[stage + 1] and sk.target >= bounds[stage])
        skips = in_flight * alive * tokens * 2 * h / tp
        activations = in_flight * layers * stored + working + skips
        out.append(MemoryEstimate(params=params, expert_params=experts, weights=2.0 * params,
                                  grads=4.0 * params, optimizer=optimizer, activations=activations,
                                  logits=logits_bytes if last else 0.0, reserve=RESERVE_BYTES,
                                  dp=dp, edp=edp, distributed_optimizer=distributed_optimizer))
    return out


def estimate(cfg: ModelConfig, world: int, tp: int, pp: int, ep: int = 1, seq_length: int = 4096,
             micro_batch_size: int = 1, recompute: str = "none",
             distributed_optimizer: bool = True) -> MemoryEstimate:
    """Memory of the fullest GPU (the fullest pipeline stage) for this layout."""
    return max(estimate_stages(cfg, world, tp, pp, ep, seq_length, micro_batch_size, recompute,
                               distributed_optimizer), key=lambda e: e.total)
