"""What an export to Hugging Face carries besides the weights.

* ``configuration_jai.py`` / ``modeling_jai.py``: the JAI architecture for ``transformers``
  (self-contained: copied into every JAI export and loaded with ``trust_remote_code=True``);
* :mod:`megatron_jai.hf.tokenizer`: the tokenizer files, special-token ids and generation config.

The conversion itself (tensor layouts, streaming) lives in :mod:`megatron_jai.checkpoint.convert`.
"""
import os

MODEL_CODE_FILES = ("configuration_jai.py", "modeling_jai.py")


def model_code_path(name: str) -> str:
    """Path of one of :data:`MODEL_CODE_FILES`."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), name)
