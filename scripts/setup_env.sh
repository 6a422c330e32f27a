#!/usr/bin/env bash
# Make (or refresh) the project's virtual environment: .venv with the CPU pins, megatron-jai
# installed editable (which also builds its C++ routing op). Safe to run again: it only reinstalls
# when requirements-cpu.txt, setup.py or kernels/ changed.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${JAI_VENV:-.venv}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
stamp="$VENV/.jai-installed"
if [ ! -f "$stamp" ] || [ -n "$(find requirements-cpu.txt setup.py kernels -newer "$stamp" -print -quit 2>/dev/null)" ]; then
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -r requirements-cpu.txt
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps -e .
  touch "$stamp"
fi
