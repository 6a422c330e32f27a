"""DUS.v2 ``TransformerBlock``: Megatron-Core's block plus long-range skip connections.

A skip ``(source, target, alpha_train, alpha_infer)`` saves the hidden state entering global layer
``source`` and blends it into the input of layer ``target``: ``h <- alpha * h_saved + (1 - alpha) * h``
with ``alpha_train`` while ``self.training`` and ``alpha_infer`` otherwise. Each layer's input is
reached through a forward pre-hook, so the layers, their checkpoint keys and Megatron's own forward
loop stay untouched. When a layer is both a target and a source, the blended input is what is saved.

Pipeline parallelism: a saved state whose target lies on a later stage (or virtual chunk) travels
with the activations: the stage output becomes ``cat([h, saved_1, ..., saved_k], -1)`` and the next
stage splits it again (gradients flow back the same way). Because the width of that tensor differs
between stage boundaries, the model's config gets ``variable_seq_lengths = True`` on every rank, so
Megatron's P2P communicator exchanges shapes before each transfer. Layouts that keep every skip
inside one stage avoid that traffic: ``megatron_jai.parallel.stage_local_layouts`` lists them.

Full activation recompute (``recompute_granularity="full"``): Megatron's ``_checkpointed_forward``
runs chunks of layers inside ``tensor_parallel.checkpoint``, whose forward runs without autograd, so
a skip state saved or blended inside a chunk would lose its gradient. :meth:`_checkpointed_forward`
therefore cuts the chunks so that every layer a skip reads or writes starts a chunk, and blends and
saves OUTSIDE the checkpointed region, on the chunk's input. ``recompute_method="block"`` keeps
Megatron's meaning exactly (the first ``recompute_num_layers`` layers of the stage checkpointed one
by one); ``"uniform"`` with ``recompute_num_layers=1`` too; with ``recompute_num_layers=k > 1`` a
chunk also ends before every skip layer, so a stage may hold a few more chunk inputs than
``layers / k``. Refused with a clear error: fp8/fp4 and ``distribute_saved_activations`` together
with full recompute (not implemented for skips).

Also refused: interleaved (virtual) pipeline layouts where a skip crosses a chunk boundary
(Megatron's interleaved schedule cannot exchange the varying shapes; virtual chunks that keep every
skip inside one chunk are fine).
"""
from __future__ import annotations

import contextlib
import functools
from typing import Sequence

import torch
from megatron.core import tensor_parallel
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset
from megatron.core.utils import get_pg_rank, get_pg_size

from megatron_jai.config import SkipConnection


class DusTransformerBlock(TransformerBlock):
    """``TransformerBlock`` that applies DUS.v2 skip connections (see the module docstring).

    ``GPTModel`` constructs a plain ``TransformerBlock``; :meth:`convert` turns that block into this
    class in place (same modules and parameters), which avoids building the decoder twice.
    """

    @classmethod
    def convert(cls, block: TransformerBlock, skips: Sequence[SkipConnection]) -> "DusTransformerBlock":
        block.__class__ = cls
        block._setup_skips(tuple(skips))
        return block

    def __init__(self, *args, skip_connections: Sequence[SkipConnection] = (), **kwargs):
        super().__init__(*args, **kwargs)
        self._setup_skips(tuple(skip_connections))

    # ---- set-up --------------------------------------------------------------------------------
    def _chunk_start(self, pp_rank: int, vp_stage) -> int:
        return get_transformer_layer_offset(self.config, vp_stage, pp_rank)

    def _stage_boundaries(self) -> list:
        """First global layer of every pipeline chunk but the first (all ranks, all vp stages)."""
        pp_size = get_pg_size(self.pg_collection.pp)
        if pp_size == 1:
            return []
        vp_size = self.config.virtual_pipeline_model_parallel_size
        starts = {self._chunk_start(r, v) for r in range(pp_size)
                  for v in (range(vp_size) if vp_size else [None])}
        return sorted(s for s in starts if 0 < s < self.config.num_layers)

    def _setup_skips(self, skips: tuple) -> None:
        self.alpha_mode = None  # None: follow self.training; "train" / "inference": forced
        # (the skips are the ModelConfig's: in range, alphas in [0, 1], checked when it was made)
        skips = tuple(s for s in skips if s.alpha_train or s.alpha_infer)  # alpha 0 = off
        self.skip_connections = skips
        if len(self.layers):
            start = self.layers[0].layer_number - 1  # layer_number is global and 1-based
        else:
            start = self._chunk_start(get_pg_rank(self.pg_collection.pp), self.vp_stage)
        end = start + len(self.layers)
        # Saved states arriving with the input / leaving with the output of this chunk.
        self._recv_sources = sorted({s.source for s in skips if s.source < start <= s.target})
        self._send_sources = sorted({s.source for s in skips if s.source < end <= s.target})
        # Every rank must agree on shape exchange, so decide from the global layout. (With an
        # explicit pipeline_model_parallel_layout the other ranks' offsets are not computable
        # here: exchange shapes whenever skips and pipelining meet.)
        if self.config.pipeline_model_parallel_layout is not None:
            crossing = bool(skips) and get_pg_size(self.pg_collection.pp) > 1
        else:
            crossing = any(s.source < b <= s.target for s in skips for b in self._stage_boundaries())
        if crossing and self.config.virtual_pipeline_model_parallel_size:
            # Megatron's interleaved schedule deadlocks (or, at PP=2, mismatches shapes) when
            # stages exchange shapes; carrying saved states needs the plain 1F1B schedule.
            raise ValueError(
                "DUS skip connections cross a virtual-pipeline chunk boundary, which the "
                "interleaved schedule cannot carry: run without virtual pipeline parallelism "
                "(any PP split works), or choose chunks that keep every skip inside one chunk")
        if crossing:
            self.config.variable_seq_lengths = True
        self._received = {}
        self._saved = {}
        self._skips_applied_outside = False  # set while a recompute chunk runs its layers
        # Local layer index -> (global index, incoming skips, saves its input) for skip layers.
        self._skip_points = {}
        for i, layer in enumerate(self.layers):
            g = layer.layer_number - 1
            incoming = [s for s in skips if s.target == g]
            saves = any(s.source == g for s in skips)
            if incoming or saves:
                self._skip_points[i] = (g, incoming, saves)
                layer.register_forward_pre_hook(
                    functools.partial(self._skip_hook, g, incoming, saves), with_kwargs=True)
        if self.config.recompute_granularity == "full":
            self._check_full_recompute()

    # ---- forward -------------------------------------------------------------------------------
    def _apply_skips(self, layer_index: int, incoming: list, saves: bool, h):
        """Blend the incoming skips into ``h`` (the input of global layer ``layer_index``) and
        save the result when the layer is a source; returns the layer's new input."""
        for s in incoming:
            mode = self.alpha_mode or ("train" if self.training else "inference")
            alpha = s.alpha_train if mode == "train" else s.alpha_infer
            if alpha:
                if s.source not in self._saved:
                    raise RuntimeError(f"DUS skip {s.source}->{s.target}: no saved state for layer "
                                       f"{s.source} (was it on another pipeline stage?)")
                h = alpha * self._saved[s.source] + (1.0 - alpha) * h
        if saves:
            self._saved[layer_index] = h
        return h

    def _skip_hook(self, layer_index: int, incoming: list, saves: bool, module, args, kwargs):
        if self._skips_applied_outside:  # _checkpointed_forward did it before the chunk
            return None
        if "hidden_states" in kwargs:
            h = kwargs["hidden_states"]
        else:
            h, args = args[0], args[1:]
        kwargs["hidden_states"] = self._apply_skips(layer_index, incoming, saves, h)
        return args, kwargs

    # ---- full activation recompute ---------------------------------------------------------------
    def _check_full_recompute(self) -> None:
        if not self._skip_points:
            return  # no skip touches this chunk: Megatron's own checkpointed forward runs
        c = self.config
        if c.recompute_method not in ("uniform", "block"):
            raise ValueError(f"full activation recompute needs recompute_method 'uniform' or "
                             f"'block', got {c.recompute_method!r}")
        if not c.recompute_num_layers or c.recompute_num_layers < 1:
            raise ValueError("full activation recompute needs recompute_num_layers >= 1")
        if c.fp8 or c.fp4 or c.distribute_saved_activations:
            raise ValueError("full activation recompute with DUS skip connections does not support "
                             "fp8/fp4 or distribute_saved_activations; turn those off or use "
                             "selective recompute")

    def _recompute_chunks(self) -> list:
        """``(start, end, checkpointed)`` local layer ranges: Megatron's chunks for the recompute
        method, also cut so that every skip layer starts a chunk."""
        n, k = len(self.layers), self.config.recompute_num_layers
        if self.config.recompute_method == "uniform":
            starts = set(range(0, n, k)) | set(self._skip_points)
            checkpointed = lambda start: True  # noqa: E731
        else:  # block: the first k layers of the stage are checkpointed one by one
            starts = set(range(n))
            checkpointed = lambda start: start < k  # noqa: E731
        starts = sorted(starts | {0})
        return [(a, b, checkpointed(a)) for a, b in zip(starts, starts[1:] + [n]) if a < b]

    def _chunk_forward(self, start: int, end: int, attention_bias, packed_seq_params):
        """Layers ``start..end-1`` as a function of the tensors ``tensor_parallel.checkpoint`` saves
        (it is called again in backward to recompute them)."""

        def run(hidden_states, attention_mask, context, context_mask, rotary_pos_emb,
                padding_mask=None):
            self._skips_applied_outside = True
            try:
                for layer in self.layers[start:end]:
                    hidden_states, context = layer(
                        hidden_states=hidden_states, attention_mask=attention_mask,
                        context=context, context_mask=context_mask, rotary_pos_emb=rotary_pos_emb,
                        attention_bias=attention_bias, inference_context=None,
                        packed_seq_params=packed_seq_params, padding_mask=padding_mask)
            finally:
                self._skips_applied_outside = False
            return hidden_states, context

        return run

    def _checkpointed_forward(self, hidden_states, attention_mask, context, context_mask,
                              rotary_pos_emb, attention_bias, packed_seq_params,
                              use_inner_quantization_context, padding_mask=None):
        """Full recompute with the skips applied between checkpointed chunks (module docstring)."""
        if not self._skip_points:
            return super()._checkpointed_forward(
                hidden_states, attention_mask, context, context_mask, rotary_pos_emb,
                attention_bias, packed_seq_params, use_inner_quantization_context,
                padding_mask=padding_mask)
        self._check_full_recompute()  # the config may have changed since the build (phases)
        for start, end, checkpointed in self._recompute_chunks():
            if start in self._skip_points:
                hidden_states = self._apply_skips(*self._skip_points[start], hidden_states)
            run = self._chunk_forward(start, end, attention_bias, packed_seq_params)
            inputs = (hidden_states, attention_mask, context, context_mask, rotary_pos_emb,
                      padding_mask)
            if checkpointed:
                hidden_states, context = tensor_parallel.checkpoint(
                    run, self.config.distribute_saved_activations, *inputs)
            else:
                hidden_states, context = run(*inputs)
        return hidden_states

    def set_input_tensor(self, input_tensor):
        """Split the states carried from the previous stage off the received activations."""
        self._received = {}
        if input_tensor is not None and self._recv_sources:
            h = self.config.hidden_size
            expected = h * (1 + len(self._recv_sources))
            if input_tensor.shape[-1] != expected:
                raise RuntimeError(f"DUS block expected a {expected}-wide input from the previous "
                                   f"stage, got {tuple(input_tensor.shape)}")
            parts = torch.split(input_tensor, h, dim=-1)
            self._received = dict(zip(self._recv_sources, parts[1:]))
            input_tensor = parts[0]
        super().set_input_tensor(input_tensor)

    def forward(self, *args, **kwargs):
        self._saved = dict(self._received)
        try:
            out = super().forward(*args, **kwargs)
            if self._send_sources:
                missing = [s for s in self._send_sources if s not in self._saved]
                if missing:
                    raise RuntimeError(f"DUS block: states of layers {missing} were never saved")
                out = torch.cat([out] + [self._saved[s] for s in self._send_sources], dim=-1)
        finally:
            self._saved = {}
        return out


@contextlib.contextmanager
def skip_alphas(model, mode: str):
    """Run ``model``'s DUS skips with ``mode`` ("train" or "inference") alphas, whatever its
    train/eval mode (e.g. a validation loss comparable with the training loss)."""
    blocks = [m for m in model.modules() if isinstance(m, DusTransformerBlock)]
    previous = [b.alpha_mode for b in blocks]
    for b in blocks:
        b.alpha_mode = mode
    try:
        yield
    finally:
        for b, p in zip(blocks, previous):
            b.alpha_mode = p
