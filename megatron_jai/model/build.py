"""Build the Megatron-Core model for a :class:`~megatron_jai.config.ModelConfig`."""
from __future__ import annotations

from typing import Optional

import torch
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel

from megatron_jai.config import ModelConfig
from megatron_jai.model.output_layer import VocabMaskedOutputLayer
from megatron_jai.model.spec import decoder_spec


class JaiGPTModel(GPTModel):
    """Megatron-Core ``GPTModel`` with the JAI architecture settings applied from the config.

    Keeps the ``ModelConfig`` it was built from (``self.jai_config``) so tools can read the
    architecture back without a second source of truth. Its logits of Megatron's vocabulary padding
    are masked (:mod:`megatron_jai.model.output_layer`).
    """

    def __init__(self, cfg: ModelConfig, transformer_config, pre_process: bool, post_process: bool,
                 use_te: Optional[bool] = None, vp_stage: Optional[int] = None):
        super().__init__(
            config=transformer_config,
            transformer_layer_spec=decoder_spec(cfg, transformer_config, use_te, vp_stage),
            vocab_size=cfg.padded_vocab_size,
            max_sequence_length=cfg.max_position_embeddings,
            pre_process=pre_process,
            post_process=post_process,
            share_embeddings_and_output_weights=cfg.tie_embeddings,
            position_embedding_type="rope",
            rotary_base=cfg.rotary_base,
            seq_len_interpolation_factor=cfg.rotary_interpolation_factor,
            vp_stage=vp_stage,
        )
        self.jai_config = cfg
        if post_process:
            VocabMaskedOutputLayer.convert(self.output_layer, cfg.vocab_size)
        if cfg.skip_connections:
            # GPTModel hard-codes TransformerBlock; convert it in place rather than build it twice.
            from megatron_jai.model.dus_block import DusTransformerBlock

            DusTransformerBlock.convert(self.decoder, cfg.skip_connections)


def build_model(cfg: ModelConfig, transformer_config=None, *, tp: int = 1, pp: int = 1, ep: int = 1,
                params_dtype: torch.dtype = torch.float32, use_te: Optional[bool] = None,
                **config_overrides) -> JaiGPTModel:
    """This rank's part of the model (its pipeline stage), on the current device.

    Model parallel state must be initialised (:func:`megatron_jai.parallel.initialize`).
    """
    if transformer_config is None:
        transformer_config = cfg.transformer_config(tp=tp, pp=pp, ep=ep, params_dtype=params_dtype,
                                                    **config_overrides)
    model = JaiGPTModel(
        cfg,
        transformer_config,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        use_te=use_te,
    )
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    return model
