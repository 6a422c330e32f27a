#!/usr/bin/env bash
# Download, on a machine with PyPI access, the wheels scripts/gpu_check.sh installs on an offline GPU
# machine: what the project needs beyond torch, triton, numpy and nvcc (which the GPU image has), for
# CPython 3.10, 3.11 and 3.12 on manylinux x86_64 (the GPU machine's Python is not known in advance).
# They go to .whl/ (ignored by git); the device tool carries them with carry=[".whl"] (< 64 MiB).
#
#   bash scripts/fetch_gpu_wheels.sh            # -> .whl/, about 20 MiB
#   PIP="python3 -m pip" bash scripts/fetch_gpu_wheels.sh /some/dir
set -euo pipefail
cd "$(dirname "$0")/.."
DEST="${1:-.whl}"
if [ -n "${PIP:-}" ]; then read -r -a PIP_CMD <<<"$PIP"
elif [ -x .venv/bin/pip ]; then PIP_CMD=(.venv/bin/pip)
else PIP_CMD=(python3 -m pip); fi
mkdir -p "$DEST"

# Compiled wheels, one per Python version (psutil's is abi3: one file serves all). Pins: the CPU
# environment's (requirements-cpu.txt); megatron-core 0.16.1 has cp310/cp311/cp312 wheels.
COMPILED=(megatron-core==0.16.1 sentencepiece==0.2.3 PyYAML==6.0.4 psutil==7.2.2)
# Pure-Python wheels and their dependencies (pip does not apply --python-version to markers: the
# Python 3.10-only ones are named).
PURE=(tqdm==4.70.1 pybind11==3.1.0 pytest==9.2.0 pytest-timeout==2.4.0 exceptiongroup tomli typing-extensions)
PLATFORMS=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64; do PLATFORMS+=(--platform "$p"); done

for py in 3.10 3.11 3.12; do
  echo "== compiled wheels for CPython $py"
  "${PIP_CMD[@]}" download -q --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version "$py" --implementation cp "${PLATFORMS[@]}" -d "$DEST" "${COMPILED[@]}"
done
echo "== pure-Python wheels and their dependencies"
"${PIP_CMD[@]}" download -q --disable-pip-version-check --only-binary=:all: --python-version 3.10 \
  --implementation cp "${PLATFORMS[@]}" -d "$DEST" "${PURE[@]}"

ls -1 "$DEST"
size=$(du -sm "$DEST" | cut -f1)
echo "$DEST: $(find "$DEST" -name '*.whl' | wc -l) wheels, ${size} MiB (the device tool carries at most 64 MiB in all)"
if [ "$size" -ge 60 ]; then
  echo "error: $DEST is too large to carry" >&2
  exit 1
fi
