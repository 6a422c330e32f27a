"""megatron-jai: package, and the routing-op extensions (C++ always; CUDA when torch has CUDA)."""
import os

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def extensions():
    """The routing op's extension ``megatron_jai.kernels._routing`` (C++, plus CUDA when torch has it), as
    kernels/build_ext.py defines it (see kernels/README.md)."""
    builder = os.path.join(HERE, "kernels", "build_ext.py")
    if not os.path.exists(builder):
        return [], {}
    scope = {"__file__": builder}
    with open(builder) as f:
        exec(compile(f.read(), builder, "exec"), scope)
    return scope["extensions"](HERE)


ext_modules, cmdclass = extensions()

setup(
    name="megatron-jai",
    version="0.1.0",
    description="Upscale a dense base model into a language-centric one and train it on Megatron-Core",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_jai", "megatron_jai.*"]) + ["megatron_jai.kernels"],
    package_dir={"megatron_jai.kernels": "kernels"},
    package_data={"megatron_jai.kernels": ["*.cpp", "*.cu", "*.h"]},
    install_requires=[
        "torch>=2.4",
        "megatron-core>=0.16.1,<0.17",
        "triton",
        "numpy",
        "sentencepiece",
        "pybind11",
        "transformers>=4.45",
        "safetensors",
        "tqdm",
        "psutil",
        "PyYAML",
        "protobuf",
    ],
    extras_require={
        "gpu": ["transformer-engine[pytorch]", "apex"],
        "eval": ["tiktoken", "tensorboard", "matplotlib", "sacrebleu>=2.4", "lm-eval>=0.4.13,<0.5",
                 "accelerate>=0.26", "datasets"],
        "test": ["pytest", "pytest-timeout", "pytest-xdist", "trl==1.16.0", "mergekit==0.1.5"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    scripts=[],
)
