#!/usr/bin/env bash
# Run the whole test suite on CPU (sets up .venv first). Extra arguments go to pytest (test paths
# narrow it; without any, pytest.ini's testpaths run).
# The whole suite runs in two passes: the single-process tests spread over JAI_TEST_WORKERS
# pytest-xdist workers (default 2; a test file stays on one worker, so its fixtures are built
# once), then the multi-process `dist` tests one at a time (they use every core themselves, and
# their kill-and-resume cases should not compete with other tests for it).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
VENV="${JAI_VENV:-.venv}"
PYTEST=("$VENV/bin/python" -m pytest -q -p no:cacheprovider --durations=20)
if [ $# -gt 0 ]; then
  exec "${PYTEST[@]}" "$@"
fi
status=0
"${PYTEST[@]}" -m "not dist" -n "${JAI_TEST_WORKERS:-2}" --dist loadfile || status=$?
"${PYTEST[@]}" -m dist || status=$((status ? status : $?))
exit "$status"
