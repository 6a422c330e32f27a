"""megatron-jai: upscale a dense base model into a language-centric one on Megatron-Core."""
__version__ = "0.1.0"
