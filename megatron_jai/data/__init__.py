"""Data: tokenizer loading, JSON-lines preprocessing to Megatron-Core indexed datasets, blended
GPT datasets and the embedded demo corpus. See docs/data.md."""
from megatron_jai.data.datasets import (DatasetError, blend_prefixes, build_datasets, max_token_id,
                                        normalize_blend, sample_shares, token_shares)
from megatron_jai.data.demo import DemoData, ensure_demo_data
from megatron_jai.data.preprocess import PreprocessError, PreprocessStats, preprocess, read_meta
from megatron_jai.data.tokenizer import Tokenizer, TokenizerError, load_tokenizer

__all__ = [
    "DatasetError", "DemoData", "PreprocessError", "PreprocessStats", "Tokenizer",
    "TokenizerError", "blend_prefixes", "build_datasets", "ensure_demo_data", "load_tokenizer",
    "max_token_id", "normalize_blend", "preprocess", "read_meta", "sample_shares", "token_shares",
]
