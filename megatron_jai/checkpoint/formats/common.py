"""What every Hugging Face format shares: the error type, the tensor-map row, the vocabulary
padding, and the config.json fields every decoder writes the same way."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from megatron_jai.cli import UserError
from megatron_jai.config import ModelConfig

TOKEN_ID_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id")


class ConversionError(UserError):
    """Input that cannot be converted (reported to the user as one line)."""


def same(cfg: ModelConfig, t: torch.Tensor) -> torch.Tensor:
    return t


@dataclass(frozen=True)
class TensorMapping:
    """One Megatron-Core checkpoint tensor and the HF tensors it is made of.

    ``mcore``: the checkpoint key (``decoder.layers.*`` keys are stacked over layers).
    ``hf``: HF names; in per-layer rows ``{layer}`` stands for the layer index.
    ``to_mcore(cfg, *hf_tensors)`` -> the Megatron tensor (one layer of it when stacked);
    ``to_hf(cfg, tensor)`` -> the HF tensor, or a tuple when ``hf`` has several names.
    """

    mcore: str
    hf: tuple
    to_mcore: Callable = same
    to_hf: Callable = same
    per_layer: bool = field(default=False)

    def hf_names(self, layer: Optional[int] = None) -> list[str]:
        return [n.format(layer=layer) for n in self.hf]


def layer_row(mcore: str, hf: str, to_mcore=same, to_hf=same) -> TensorMapping:
    """A per-layer row: ``decoder.layers.<mcore>`` <-> ``model.layers.{layer}.<hf>``."""
    return TensorMapping(f"decoder.layers.{mcore}", (f"model.layers.{{layer}}.{hf}",),
                         to_mcore, to_hf, per_layer=True)


def check_rows(what: str, t: torch.Tensor, rows: int) -> None:
    if t.shape[0] != rows:
        raise ConversionError(f"{what} has {t.shape[0]} rows, the config implies {rows}")


def pad_vocab(cfg: ModelConfig, table: torch.Tensor) -> torch.Tensor:
    """``[vocab, H]`` -> ``[padded_vocab, H]`` with zero rows (never produce those tokens' logits
    from noise: zero output rows give logit 0, and padded ids never occur in data)."""
    check_rows("vocabulary table", table, cfg.vocab_size)
    pad = cfg.padded_vocab_size - cfg.vocab_size
    return torch.cat([table, table.new_zeros(pad, table.shape[1])]) if pad else table


def unpad_vocab(cfg: ModelConfig, table: torch.Tensor) -> torch.Tensor:
    check_rows("vocabulary table", table, cfg.padded_vocab_size)
    return table[: cfg.vocab_size]


def rope_theta(hf: dict) -> float:
    params = hf.get("rope_parameters") or {}
    if "rope_theta" in params:  # transformers >= 5 writes rope_parameters
        return float(params["rope_theta"])
    return float(hf.get("rope_theta", 10000.0))


def set_architecture_fields(hf: dict, cfg: ModelConfig, want: dict, rope_defaults: dict) -> None:
    """Set ``want``, head_dim and the RoPE base in the HF config dict ``hf``, touching only the
    values that differ, so an unchanged model's config.json round-trips byte for byte."""
    for key, value in want.items():
        if hf.get(key) != value:
            hf[key] = value
    if cfg.head_dim * cfg.num_attention_heads != cfg.hidden_size or hf.get("head_dim"):
        if hf.get("head_dim") != cfg.head_dim:
            hf["head_dim"] = cfg.head_dim
    has_theta = "rope_theta" in hf or "rope_theta" in (hf.get("rope_parameters") or {})
    if not has_theta or rope_theta(hf) != cfg.rotary_base:
        if "rope_theta" in hf and "rope_parameters" not in hf:  # transformers 4 style
            hf["rope_theta"] = cfg.rotary_base
        else:
            params = dict(hf.get("rope_parameters") or rope_defaults)
            params["rope_theta"] = cfg.rotary_base
            hf["rope_parameters"] = params
