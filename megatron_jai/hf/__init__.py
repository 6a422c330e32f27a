"""The export to Hugging Face and what it carries besides the weights.

* :mod:`megatron_jai.hf.export`: ``mcore_to_hf``, the streaming export of a checkpoint;
* ``configuration_jai.py`` / ``modeling_jai.py``: the JAI architecture for ``transformers``
  (self-contained: copied into every JAI export and loaded with ``trust_remote_code=True``);
* :mod:`megatron_jai.hf.tokenizer`: the tokenizer files, special-token ids and generation config.

The tensor layouts of the formats live in :mod:`megatron_jai.checkpoint.formats`, the import
direction in :mod:`megatron_jai.checkpoint.convert`.
"""
import os

MODEL_CODE_FILES = ("configuration_jai.py", "modeling_jai.py")


def model_code_path(name: str) -> str:
    """Path of one of :data:`MODEL_CODE_FILES`."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), name)
