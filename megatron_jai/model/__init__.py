from megatron_jai.model.build import JaiGPTModel, build_model
from megatron_jai.model.spec import layer_spec

__all__ = ["JaiGPTModel", "build_model", "layer_spec"]
