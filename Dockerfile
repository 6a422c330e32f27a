# megatron-jai on an NGC PyTorch base (CUDA, cuDNN, NCCL, PyTorch, Transformer Engine and apex
# come with the image). Builds the project's kernels (C++ + CUDA routing op) for Hopper.
#
#   docker build -t megatron-jai .
#   docker run --gpus all --ipc=host --ulimit memlock=-1 --ulimit stack=67108864 --rm -it \
#       -v /data:/data megatron-jai \
#       torchrun --nproc_per_node 8 pretrain_jai.py --config examples/jai_1gpu.yaml
#
# Megatron-Core releases are tested on the previous month's NGC container; override the base with
# --build-arg BASE_IMAGE=... when pairing with another megatron-core. See docs/scale_out.md.
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.12-py3
FROM ${BASE_IMAGE}

# NGC images pin their Python environment through PIP_CONSTRAINT; our pins below are compatible
# with the image's torch, so lift the constraint (as Megatron-Core's install guide does).
ENV PIP_CONSTRAINT= \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    TORCH_CUDA_ARCH_LIST="9.0" \
    CUDA_DEVICE_MAX_CONNECTIONS=1 \
    JAI_CACHE_DIR=/workspace/cache

WORKDIR /workspace/megatron-jai

# Python dependencies first (cached layer). torch, triton, numpy, transformer-engine and apex are
# the image's own CUDA builds and are NOT reinstalled; the rest uses the versions pinned for CI.
COPY requirements-cpu.txt ./
RUN grep -E '^(megatron-core|sentencepiece|transformers|tokenizers|safetensors|tiktoken|tqdm|psutil|PyYAML|protobuf|pybind11|tensorboard|matplotlib|sacrebleu|lm-eval|accelerate|datasets|trl|mergekit|peft|immutables|pytest|pytest-timeout|pytest-xdist|execnet)==' \
        requirements-cpu.txt > /tmp/requirements-gpu.txt \
 && pip install --no-cache-dir -r /tmp/requirements-gpu.txt \
 && rm /tmp/requirements-gpu.txt

# The project, installed editable; --no-build-isolation so the kernels compile against the
# image's torch (setup.py -> kernels/build_ext.py: CUDA routing op when CUDA_HOME is present).
COPY . .
RUN pip install --no-cache-dir --no-build-isolation --no-deps -e . \
 && python -c "import torch, megatron.core, megatron_jai, megatron_jai.kernels._routing as r; \
print('megatron-jai', megatron_jai.__version__, '| torch', torch.__version__, '| cuda', torch.version.cuda, '| routing op', r.__file__)" \
 && mkdir -p /workspace/cache

CMD ["bash"]
