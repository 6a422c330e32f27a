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
inside one stage avoid that traffic: ``megatron_jai.upscale.plan.stage_local_layouts`` lists them.

Refused with a clear error: full activation recompute (a saved state would cross recompute chunks,
whose forward runs without autograd; use selective recompute), and interleaved (virtual) pipeline
layouts where a skip crosses a chunk boundary (Megatron's interleaved schedule cannot exchange the
varying shapes; virtual chunks that keep every skip inside one chunk are fine).
"""
from __future__ import annotations

import functools
from typing import Sequence

import torch
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
        num_layers = self.config.num_layers
        for s in skips:
            if not 0 <= s.source < s.target < num_layers:
                raise ValueError(f"skip connection {s.source}->{s.target} is outside the "
                                 f"{num_layers} layers of the model")
        skips = tuple(s for s in skips if s.alpha_train or s.alpha_infer)  # alpha 0 = off
        if skips and self.config.recompute_granularity == "full":
            raise ValueError("DUS skip connections do not support full activation recompute "
                             "(recompute_granularity='full'); use selective recompute")
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
        for layer in self.layers:
            g = layer.layer_number - 1
            incoming = [s for s in skips if s.target == g]
            saves = any(s.source == g for s in skips)
            if incoming or saves:
                layer.register_forward_pre_hook(
                    functools.partial(self._skip_hook, g, incoming, saves), with_kwargs=True)

    # ---- forward -------------------------------------------------------------------------------
    def _skip_hook(self, layer_index: int, incoming: list, saves: bool, module, args, kwargs):
        if "hidden_states" in kwargs:
            h = kwargs["hidden_states"]
        else:
            h, args = args[0], args[1:]
        for s in incoming:
            alpha = s.alpha_train if self.training else s.alpha_infer
            if alpha:
                if s.source not in self._saved:
                    raise RuntimeError(f"DUS skip {s.source}->{s.target}: no saved state for layer "
                                       f"{s.source} (was it on another pipeline stage?)")
                h = alpha * self._saved[s.source] + (1.0 - alpha) * h
        if saves:
            self._saved[layer_index] = h
        kwargs["hidden_states"] = h
        return args, kwargs

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
