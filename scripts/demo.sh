#!/usr/bin/env bash
# The main job on its embedded tiny default: 2 CPU processes, demo corpus written by the project.
# Extra arguments go to pretrain_jai.py (try --help).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
VENV="${JAI_VENV:-.venv}"
exec "$VENV/bin/torchrun" --nproc_per_node 2 pretrain_jai.py "$@"
