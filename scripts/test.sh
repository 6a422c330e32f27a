#!/usr/bin/env bash
# Run the whole test suite on CPU (sets up .venv first). Extra arguments go to pytest (test paths
# narrow it; without any, pytest.ini's testpaths run).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
VENV="${JAI_VENV:-.venv}"
exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider --durations=20 "$@"
