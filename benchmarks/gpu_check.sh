#!/usr/bin/env bash
# The GPU check: every kernel test on CUDA, then the kernel sweep, in about 8 minutes on an
# H200. Prints the sweep's summary table last; with $OUT set, writes gpu_tests.xml,
# gpu_check.log, sweep.csv, sweep.json and sweep.png there.
#
#   bash benchmarks/gpu_check.sh            # PYTHON=... to choose the interpreter
#   GPU_CHECK_DRY=1 bash benchmarks/gpu_check.sh   # the same pipeline on CPU (sweep --dry-run)
#
# Needs torch with CUDA, triton and pytest (hypothesis optional); no install of the repository.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"
TOTAL_S="${GPU_CHECK_SECONDS:-460}"   # whole check; the sweep gets what the tests leave
TESTS_S="${GPU_TESTS_SECONDS:-240}"
start=$(date +%s)

if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT"
    exec > >(tee "$OUT/gpu_check.log") 2>&1
fi

dry=()
if [ -n "${GPU_CHECK_DRY:-}" ]; then
    dry=(--dry-run)
else
    "$PY" - <<'PYEOF' || { echo "gpu_check: no CUDA device visible to $PY"; exit 2; }
import torch, triton
assert torch.cuda.is_available()
print(f"{torch.cuda.get_device_name()} · torch {torch.__version__} · triton {triton.__version__}")
PYEOF
fi
"$PY" -c "import hypothesis" 2>/dev/null || echo "gpu_check: hypothesis not installed: the fuzz test is skipped"

# 1. Kernel tests on CUDA. PLRD_AUTOTUNE=0: each kernel compiles one fixed config per shape
#    (the GPU tests run every autotune config explicitly), so many shapes stay quick.
junit=()
[ -n "${OUT:-}" ] && junit=(--junitxml "$OUT/gpu_tests.xml")
PLRD_AUTOTUNE=0 timeout "$TESTS_S" "$PY" -m pytest tests/kernels -q -p no:cacheprovider \
    -m "not slow" -rfEs ${junit[@]+"${junit[@]}"}
tests_rc=$?
case $tests_rc in
    0) tests_status="kernel tests: all passed" ;;
    124) tests_status="kernel tests: TIMED OUT after ${TESTS_S}s" ;;
    *) tests_status="kernel tests: FAILED (pytest exit $tests_rc)" ;;
esac
echo "$tests_status"

# 1b. FSDP2 over NCCL with LowRankLinear on the GPU (a tiny family, one rank per device up to 2).
fsdp_junit=()
[ -n "${OUT:-}" ] && fsdp_junit=(--junitxml "$OUT/gpu_fsdp.xml")
fsdp_log=$(mktemp)
timeout 150 "$PY" -m pytest tests/family/test_distributed.py -q -p no:cacheprovider \
    -k fsdp2_on_gpus -rfEs ${fsdp_junit[@]+"${fsdp_junit[@]}"} | tee "$fsdp_log"
fsdp_rc=${PIPESTATUS[0]}
if [ "$fsdp_rc" = 124 ]; then
    tests_status="$tests_status; FSDP2 on GPU: TIMED OUT after 150s"
elif [ "$fsdp_rc" != 0 ]; then
    tests_status="$tests_status; FSDP2 on GPU: FAILED (pytest exit $fsdp_rc)"
elif grep -q "1 passed" "$fsdp_log"; then
    tests_status="$tests_status; FSDP2 on GPU: passed"
else
    tests_status="$tests_status; FSDP2 on GPU: skipped (no CUDA device)"
fi
rm -f "$fsdp_log"

# 2. The sweep, with the time that is left (it stops starting cases when its budget runs out).
elapsed=$(( $(date +%s) - start ))
budget=$(( TOTAL_S - elapsed - 30 ))
[ "$budget" -lt 60 ] && budget=60
echo "sweep budget: ${budget}s"
"$PY" benchmarks/sweep.py --budget "$budget" --note "$tests_status" ${dry[@]+"${dry[@]}"}
sweep_rc=$?
[ "$tests_rc" -eq 0 ] && [ "$sweep_rc" -eq 0 ]
