#!/usr/bin/env bash
# GPU check of megatron-jai in one call (issue 11), within a time budget (default 480 s):
#   env    versions: GPU, driver, CUDA (nvcc), python, torch, triton; git commit, date
#   wheels installs what the machine lacks, offline, from .whl/ (made by scripts/fetch_gpu_wheels.sh)
#   build  the CUDA routing op: pip install --no-build-isolation --no-deps -e . ; asserts it loaded
#   aot    tools/compile_kernels.py: the Triton kernels compiled for sm_90 by this machine's Triton
#          (registers, spills, wgmma of the first configurations)
#   tests  pytest -m gpu (tests/test_gpu.py: bf16 kernels and layer vs fp32, CUDA routing op vs C++,
#          pretrain_jai.py tiny-moe on the Triton backend, with and without DUS skips)
#   moe    tools/bench_moe.py --check: the MoE layer table against torch._grouped_mm, the kernel rows
#   train  tools/bench_train.py: one-GPU training table of examples/jai_1gpu.yaml's model at 4K
# Each phase runs under its own time limit, cut so the later phases keep time; a failed phase does not
# stop the later ones. The end repeats the tables and lists the failed phases; the exit status is 0
# when all passed, 1 when a phase failed, 2 on bad usage or when no CUDA GPU is visible.
#
#   bash scripts/gpu_check.sh [--dry-run] [--only PHASE,...] [--budget SECONDS]
#
# The GPU machine is offline: run `bash scripts/fetch_gpu_wheels.sh` where PyPI is reachable first and
# carry .whl. With the device tool:
#   run(command="bash scripts/gpu_check.sh", carry=[".whl"], timeout_s=540)
# Logs go to $OUT (the device tool brings them back) or to a temporary folder.
set -uo pipefail
cd "$(dirname "$0")/.."

PHASES=(env wheels build aot tests moe train)
BUDGET=480
DRY=0
ONLY=""
usage() { sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --only) ONLY="${2:-}"; shift ;;
    --budget) BUDGET="${2:-}"; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu_check.sh: error: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done
if ! [[ "$BUDGET" =~ ^[0-9]+$ ]] || [ "$BUDGET" -lt 60 ]; then
  echo "gpu_check.sh: error: --budget must be a number of seconds >= 60" >&2; exit 2
fi
for p in ${ONLY//,/ }; do
  [[ " ${PHASES[*]} " == *" $p "* ]] || { echo "gpu_check.sh: error: unknown phase '$p' (phases: ${PHASES[*]})" >&2; exit 2; }
done
selected() { [ -z "$ONLY" ] || [[ ",$ONLY," == *",$1,"* ]]; }

PY="${PYTHON:-python3}"
LOGS="${OUT:-$(mktemp -d /tmp/gpu_check.XXXXXX)}"
mkdir -p "$LOGS"
exec > >(tee "$LOGS/gpu_check.log") 2>&1
TEE_PID=$!
trap 'exec >&- 2>&-; wait "$TEE_PID" 2>/dev/null' EXIT  # the log is complete when the script returns
START=$(date +%s)
# Per phase: the most it may take, and the least it needs (reserved while earlier phases run).
declare -A CAP=([env]=30 [wheels]=60 [build]=180 [aot]=60 [tests]=180 [moe]=170 [train]=150)
declare -A NEED=([env]=10 [wheels]=10 [build]=60 [aot]=20 [tests]=60 [moe]=60 [train]=60)
FAILED=()

# The wheels .whl/ should hold (module to import = requirement), beyond torch, triton, numpy.
REQUIREMENTS=("megatron.core=megatron-core==0.16.1" "sentencepiece=sentencepiece" "yaml=PyYAML"
              "psutil=psutil" "tqdm=tqdm" "pytest=pytest" "pytest_timeout=pytest-timeout")

# Commands of the phases after env and wheels (run with `timeout`, output to stdout and $LOGS/PHASE.log).
declare -A COMMAND=(
  [build]="MAX_JOBS=16 $PY -m pip install --no-index --no-build-isolation --no-deps -e . && $PY -c 'import megatron_jai.kernels._routing as r; assert r.has_cuda, \"the routing op was built without CUDA\"; print(\"CUDA routing op loaded:\", r.__file__)'"
  [aot]="$PY tools/compile_kernels.py --no-progress"
  [tests]="JAI_MOE_AUTOTUNE=0 $PY -m pytest -m gpu -q -p no:cacheprovider -rfE --durations=15 tests/test_gpu.py"
  [moe]="$PY tools/bench_moe.py --check --iters 10 --warmup 3"
  [train]="$PY tools/bench_train.py --steps 6 --warmup-steps 2 --global-batch-size 8"
)

timeout_for() {  # seconds phase $1 may take: its cap, less what the later selected phases need
  local phase=$1 reserve=0 later=0 p now left
  for p in "${PHASES[@]}"; do
    if [ "$later" = 1 ] && selected "$p"; then reserve=$((reserve + NEED[$p])); fi
    [ "$p" = "$phase" ] && later=1
  done
  now=$(date +%s)
  left=$((START + BUDGET - 10 - now - reserve))
  [ "$left" -gt "${CAP[$phase]}" ] && left=${CAP[$phase]}
  echo "$left"
}

banner() { echo; echo "=== [$(( $(date +%s) - START ))s] $*"; }

run_phase() {  # phase name, then the command string
  local phase=$1 cmd=$2 limit rc t0
  limit=$(timeout_for "$phase")
  banner "$phase (limit ${limit}s): $cmd"
  if [ "$DRY" = 1 ]; then return 0; fi
  if [ "$limit" -lt 15 ]; then
    echo "skipped: the budget is spent"; FAILED+=("$phase (no time left)"); return 0
  fi
  t0=$(date +%s)
  PYTHONUNBUFFERED=1 timeout --kill-after=15 "$limit" bash -c "$cmd" 2>&1 | tee "$LOGS/$phase.log"
  rc=${PIPESTATUS[0]}
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    echo "--- $phase: TIMED OUT after ${limit}s"; FAILED+=("$phase (timed out after ${limit}s)")
  elif [ "$rc" != 0 ]; then
    echo "--- $phase: FAILED (exit $rc) in $(( $(date +%s) - t0 ))s"; FAILED+=("$phase (exit $rc)")
  else
    echo "--- $phase: ok in $(( $(date +%s) - t0 ))s"
  fi
}

phase_env() {
  banner "env"
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (with local changes)')"
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
  else
    echo "nvidia-smi: not found"
  fi
  if command -v nvcc >/dev/null; then nvcc --version | tail -n 2; else echo "nvcc: not found (needed to build the CUDA routing op)"; fi
  "$PY" - <<'EOF'
import platform, sys
print("python", platform.python_version(), sys.executable)
try:
    import torch
    print("torch", torch.__version__, "cuda", torch.version.cuda, "| cuda available:", torch.cuda.is_available(),
          "|", torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU")
except ImportError as err:
    print("torch: not importable:", err)
try:
    import triton
    print("triton", triton.__version__)
except ImportError as err:
    print("triton: not importable:", err)
EOF
  if [ "$DRY" = 0 ] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_check.sh: error: no CUDA GPU visible to torch ($PY); this script checks a GPU machine" >&2
    exit 2
  fi
}

missing_requirements() {  # the requirements of REQUIREMENTS whose module does not import, one a line
  PYTHONWARNINGS=ignore "$PY" - "${REQUIREMENTS[@]}" <<'EOF'
import sys
for entry in sys.argv[1:]:
    module, requirement = entry.split("=", 1)
    try:
        __import__(module)
    except Exception:
        print(requirement)
EOF
}

phase_wheels() {
  banner "wheels (limit $(timeout_for wheels)s)"
  local need=() missing=()
  mapfile -t need < <(missing_requirements)
  if [ ${#need[@]} -eq 0 ]; then echo "all present: ${REQUIREMENTS[*]%%=*}"; return 0; fi
  echo "missing here: ${need[*]}"
  if [ ! -d .whl ]; then
    echo "--- wheels: FAILED: no .whl/ folder: run 'bash scripts/fetch_gpu_wheels.sh' on a machine with PyPI and carry .whl"
    FAILED+=("wheels (no .whl/: missing ${need[*]})"); return 0
  fi
  [ "$DRY" = 1 ] && { echo "would install from .whl: ${need[*]}"; return 0; }
  # Into the environment (its torch, numpy, packaging satisfy the dependencies); where that is not
  # writable, into a folder on PYTHONPATH without dependencies.
  if ! timeout "$(timeout_for wheels)" "$PY" -m pip install -q --no-index --find-links .whl "${need[@]}"; then
    echo "pip could not install into the environment; trying --target /tmp/jai-site"
    timeout "$(timeout_for wheels)" "$PY" -m pip install -q --no-index --no-deps --find-links .whl \
      --target /tmp/jai-site "${need[@]}"
    export PYTHONPATH="/tmp/jai-site${PYTHONPATH:+:$PYTHONPATH}"
  fi
  mapfile -t missing < <(missing_requirements)
  if [ ${#missing[@]} -gt 0 ]; then
    echo "--- wheels: FAILED: still missing ${missing[*]} (no wheel in .whl for this Python?)"
    FAILED+=("wheels (missing ${missing[*]})")
  else
    echo "--- wheels: ok (installed ${need[*]})"
  fi
}

summary() {
  banner "summary"
  grep -E "^(date|commit|python|torch|triton|NVIDIA|Cuda compilation|Build cuda)" "$LOGS/gpu_check.log" 2>/dev/null | head -n 8
  if [ -f "$LOGS/tests.log" ]; then
    echo "tests: $(grep -E '(passed|failed|error)' "$LOGS/tests.log" | tail -n 1)"
    grep -E '^(FAILED|ERROR) ' "$LOGS/tests.log" | cut -c1-300 | head -n 20
  fi
  if [ -f "$LOGS/aot.log" ]; then
    echo "aot: $(grep -E '^compile_kernels: ' "$LOGS/aot.log" | tail -n 1)"
  fi
  if [ -f "$LOGS/moe.log" ]; then
    echo "--- MoE table (tools/bench_moe.py --check --iters 10 --warmup 3)"
    sed -n '/^shape (T,H,F,E,k)/,$p' "$LOGS/moe.log"
  fi
  if [ -f "$LOGS/train.log" ]; then
    echo "--- training table (tools/bench_train.py --steps 6 --warmup-steps 2 --global-batch-size 8)"
    sed -n '/^bench_train:/p; /^training table:/,$p' "$LOGS/train.log"
  fi
  echo "logs: $LOGS; total $(( $(date +%s) - START ))s of the ${BUDGET}s budget"
  if [ ${#FAILED[@]} -gt 0 ]; then
    echo "FAILED phases: ${FAILED[*]}"
    return 1
  fi
  echo "all phases passed"
}

selected env && phase_env
selected wheels && phase_wheels
for phase in build aot tests moe train; do
  selected "$phase" && run_phase "$phase" "${COMMAND[$phase]}"
done
if [ "$DRY" = 1 ]; then
  banner "dry run: nothing was run (logs would go to $LOGS)"
  exit 0
fi
summary
