#!/usr/bin/env bash
# Every GPU check of the project in one run, finished within 8 minutes.
#
#   bash bench/gpu_suite.sh            # on a GPU machine, from anywhere
#   OUT=/some/dir bash bench/gpu_suite.sh   # JSON/log outputs go to $OUT
#
# Order: correctness before speed (a fast wrong kernel is worth nothing), then
# timings. Each step has its own `timeout` budget, and every budget is also
# clipped to what is left of the 8-minute deadline, so the whole script always
# ends in time and still reports the steps it reached. Exit status: 0 only if
# every step that ran passed.
set -u
cd "$(dirname "$0")/.."

PY="${PYTHON:-python}"
OUT="${OUT:-bench/out}"   # /bench/out/ is git-ignored
mkdir -p "$OUT"
TOTAL_S=470                      # 8 min = 480 s, minus a margin for teardown
DEADLINE=$((SECONDS + TOTAL_S))
declare -a SUMMARY=()
STATUS=0

# step NAME BUDGET_S CMD...: runs CMD under timeout min(BUDGET_S, time left).
step() {
  local name="$1" budget="$2"; shift 2
  local left=$((DEADLINE - SECONDS))
  if (( left < budget )); then budget=$left; fi
  if (( budget < 10 )); then
    SUMMARY+=("SKIP  $name (no time left)")
    return
  fi
  echo
  echo "=== $name (budget ${budget}s): $*"
  local t0=$SECONDS
  timeout --signal=INT --kill-after=10 "$budget" "$@"
  local rc=$?
  local took=$((SECONDS - t0))
  if (( rc == 0 )); then
    SUMMARY+=("PASS  $name (${took}s)")
  elif (( rc == 124 || rc == 137 )); then
    SUMMARY+=("TIME  $name (killed after ${budget}s)"); STATUS=1
  else
    SUMMARY+=("FAIL  $name (rc=$rc, ${took}s)"); STATUS=1
  fi
}

"$PY" -c 'import jax; print("devices:", jax.devices(), "jax", jax.__version__)'

# 1. Pallas kernel correctness on the real Triton lowering (tests marked gpu).
step "pallas kernels: correctness (pytest -m gpu)" 150 \
  "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/pallas_kernels

# 2. Pallas kernel timings vs dense masked XLA and cuDNN attention. The bench
#    stops starting new cases after --budget-s, leaving room to print.
step "pallas kernels: timings (bench/attention_kernels.py --gpu)" 170 \
  "$PY" bench/attention_kernels.py --gpu --budget-s 130 --json "$OUT/attention_kernels.json"

# 3. [lead] Decoder training throughput / MFU.
if [[ -f bench/train_throughput.py ]]; then
  step "decoder MFU (bench/train_throughput.py --gpu)" 80 \
    "$PY" bench/train_throughput.py --gpu
fi

# 4. [lead] LLM decode throughput.
if [[ -f bench/generate_throughput.py ]]; then
  step "LLM decode (bench/generate_throughput.py --gpu)" 60 \
    "$PY" bench/generate_throughput.py --gpu
fi

# [lead] add further GPU checks above this line, each as `step NAME BUDGET CMD`,
# keeping the budgets' sum within TOTAL_S.

echo
echo "=== summary (${SECONDS}s of ${TOTAL_S}s)"
printf '%s\n' "${SUMMARY[@]}"
exit $STATUS
