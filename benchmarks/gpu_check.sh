#!/usr/bin/env bash
# The GPU check, in stages, each under a hard time limit, each writing what it finishes:
#   1. target   sweep.py --stage target: M 8192, K = N = 4096, R 64/128/256, bf16, fwd and
#               fwd+bwd; fused vs the eager two-GEMM chain vs the compiled chain vs dense
#   2. decode   sweep.py --stage decode: M 1 and 16
#   3. tests    a trimmed correctness set on CUDA (the first call under autotuning, bf16 and
#               fp16 vs float64, rank chunks, opcheck, inductor)
#   4. fsdp2    $FSDP_TEST -k fsdp2_on_gpus (FSDP2 over NCCL with LowRankLinear)
# then the summary (table, goals) from what was written. Every sweep measurement is appended
# to $OUT/sweep.jsonl and $OUT/sweep.csv the moment it finishes; the tests print a line each
# to $OUT/gpu_check.log as they finish. A stage cut short loses only its unfinished work.
#
#   bash benchmarks/gpu_check.sh                    # PYTHON=... picks the interpreter
#   GPU_CHECK_DRY=1 bash benchmarks/gpu_check.sh    # the same pipeline on CPU, tiny shapes
#
# Time limits in seconds (env): GPU_CHECK_SECONDS for the whole (default 440), and per stage
# GPU_CHECK_TARGET_S (160), GPU_CHECK_DECODE_S (45), GPU_CHECK_TESTS_S (170),
# GPU_CHECK_FSDP_S (60). A stage gets min(its limit, what is left of the whole) and is
# killed by `timeout` when that runs out; a sweep also stops starting new measurements 15 s
# before. Results go to $OUT (default: a new temporary folder, printed first).
# Needs torch with CUDA, triton and pytest; no install of the repository.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"
FSDP_TEST="${FSDP_TEST:-tests/family/test_distributed.py}"   # selected with -k fsdp2_on_gpus
TOTAL_S="${GPU_CHECK_SECONDS:-440}"
TARGET_S="${GPU_CHECK_TARGET_S:-160}"
DECODE_S="${GPU_CHECK_DECODE_S:-45}"
TESTS_S="${GPU_CHECK_TESTS_S:-170}"
FSDP_S="${GPU_CHECK_FSDP_S:-60}"
SUMMARY_S=20   # kept back from the whole for the summary

# The correctness set on a GPU, most important first (the tests' own order within a file).
GPU_TESTS=(
    "tests/kernels/test_autotune.py::test_first_call_under_autotuning[fp16-chunked]"
    "tests/kernels/test_autotune.py::test_first_call_under_autotuning[fp16-decode]"
    "tests/kernels/test_autotune.py::test_first_call_under_autotuning[fp32-chunked]"
    "tests/kernels/test_autotune.py::test_forward_and_dx_chains_tune_apart"
    "tests/kernels/test_gpu.py::test_auto_dispatch_on_cuda"
    "tests/kernels/test_gpu.py::test_bf16"
    "tests/kernels/test_chain.py::test_rank_chunks"
    "tests/kernels/test_gpu.py::test_opcheck_full"
    "tests/kernels/test_gpu.py::test_torch_compile_inductor"
    "tests/kernels/test_gpu.py::test_dynamic_rows_inductor"
    "tests/kernels/test_op.py::test_forward_and_grads"
)
# On CPU (dry run) the same stage runs one quick interpreter test instead.
DRY_TESTS=("tests/kernels/test_autotune.py::test_forward_and_dx_chains_tune_apart")

OUT="${OUT:-$(mktemp -d -t gpu_check.XXXXXX)}"
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
echo "gpu_check: results in $OUT"
start=$(date +%s)
STATUS=()

dry=()
tests=("${GPU_TESTS[@]}")
if [ -n "${GPU_CHECK_DRY:-}" ]; then
    dry=(--dry-run)
    tests=("${DRY_TESTS[@]}")
else
    "$PY" - <<'PYEOF' || { echo "gpu_check: no CUDA device visible to $PY"; exit 2; }
import torch, triton
assert torch.cuda.is_available()
print(f"{torch.cuda.get_device_name()} · torch {torch.__version__} · triton {triton.__version__}")
PYEOF
fi

# limit_for CAP: min(CAP, what is left of the whole after the summary's reserve).
limit_for() {
    local left=$(( TOTAL_S - SUMMARY_S - ($(date +%s) - start) ))
    if [ "$1" -lt "$left" ]; then echo "$1"; else echo "$left"; fi
}

# run_stage NAME LIMIT CMD...: CMD under `timeout`; records "NAME: ok / TIMED OUT / FAILED".
run_stage() {
    local name=$1 limit=$2
    shift 2
    if [ "$limit" -lt 10 ]; then
        STATUS+=("$name: not run (the whole check's limit is spent)")
        echo "gpu_check: ${STATUS[-1]}"
        return
    fi
    echo "== $name (limit ${limit}s, $(( $(date +%s) - start ))s elapsed) =="
    timeout -k 5 "$limit" "$@"
    local rc=$?
    case $rc in
        0) STATUS+=("$name: ok") ;;
        124 | 137) STATUS+=("$name: TIMED OUT after ${limit}s (finished parts are written)") ;;
        *) STATUS+=("$name: FAILED (exit $rc)") ;;
    esac
    echo "gpu_check: ${STATUS[-1]}"
}

for stage in target decode; do
    cap=$TARGET_S
    [ "$stage" = decode ] && cap=$DECODE_S
    limit=$(limit_for "$cap")
    run_stage "$stage sweep" "$limit" "$PY" benchmarks/sweep.py --stage "$stage" --out "$OUT" \
        --deadline $(( limit > 30 ? limit - 15 : limit / 2 )) ${dry[@]+"${dry[@]}"}
done

run_stage "correctness tests" "$(limit_for "$TESTS_S")" \
    env PLRD_AUTOTUNE=0 "$PY" -m pytest "${tests[@]}" -v -p no:cacheprovider -rfEs -o addopts="" \
    --junitxml "$OUT/gpu_tests.xml"

fsdp_log="$OUT/.fsdp.out"
run_stage "FSDP2 on GPU" "$(limit_for "$FSDP_S")" bash -c \
    "set -o pipefail; '$PY' -m pytest '$FSDP_TEST' -q -p no:cacheprovider -o addopts='' \
    -k fsdp2_on_gpus -rfEs --junitxml '$OUT/gpu_fsdp.xml' | tee '$fsdp_log'"
if [ "${STATUS[-1]}" = "FSDP2 on GPU: ok" ] && ! grep -q " passed" "$fsdp_log" 2>/dev/null; then
    STATUS[-1]="FSDP2 on GPU: skipped (no CUDA device)"
fi
rm -f "$fsdp_log"

note=$(IFS=';'; echo "${STATUS[*]}")
timeout -k 5 "$SUMMARY_S" "$PY" benchmarks/sweep.py --summarize --out "$OUT" --note "$note"
echo "gpu_check: ${note//;/ | } ($(( $(date +%s) - start ))s)"
for line in "${STATUS[@]}"; do
    case $line in *": ok" | *"skipped (no CUDA device)") ;; *) exit 1 ;; esac
done
exit 0
