#!/usr/bin/env bash
# The GPU check: install, the tests marked gpu, then the bench, in one call of under 8 minutes on one
# NVIDIA H100 or H200 with no network. It always leaves a report, whatever fails.
#
#   bash bench/gpu_check.sh [RESULTS_DIR]                 (default: bench/results/tmp/gpu-check, git-ignored)
#   SPO_GPU_CHECK_CPU=1 bash bench/gpu_check.sh DIR       (dry run on a CPU: toy model, this Python, no install)
#
# Before it, on a machine with the package index: `bash bench/gpu_wheels.sh` (the bundle, in bench/wheels).
#
# Phases and their time budgets in seconds (GPU_CHECK_BUDGET_S, default 470, bounds the whole script):
#   install    90  pip install --no-index --find-links bench/wheels 'spo-align[train,deepspeed]' into the
#                  machine's Python: pip keeps what the image holds where it meets the pins and installs the
#                  rest from the bundle. If pip refuses, every carried wheel is installed without dependency
#                  checks ("fallback"), and if that fails too, into a folder of their own put on PYTHONPATH.
#                  The code run is always this checkout's src/ (first on PYTHONPATH).
#   env        45  nvidia-smi, torch and CUDA versions, package versions (python -m bench env)
#   gpu-tests  90  pytest -m gpu over the test files that hold gpu tests
#   bench     rest python -m bench run --size gpu (bench/gpu_plan.py): the card's measured bf16 peak, TRL's
#                  DPOTrainer, packed SPO (live reference, precomputed reference, LoRA) under sdpa, the
#                  per-sequence packed-vs-padded log-prob check with its leaking control (bench/logp_check.py;
#                  for flash_attention_2 the single-row layout with cu_seq_lens), `spo eval generate`, then
#                  the other kernels, then TRL with
#                  precompute. Each run is its own process under its own cap (45-150 s); a run that would
#                  start with too little time left is recorded as skipped.
#   report     30  kept back at the end: python -m bench gpu-report; logs archived
# RESULTS_DIR then holds at most 5 files (a device call returns at most 8): gpu.json and gpu.md (gpu-cpu.*
# in the dry run), gpu_check.log, gpu_tests.log and logs.tar.gz (install, environment, every run's log).
# flash_attention_2 is measured only where flash-attn imports; the image has none and none is built here.
# Exit status: 0 when every phase and every run succeeded; 1 otherwise (the report says what and why).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
RESULTS="${1:-bench/results/tmp/gpu-check}"
mkdir -p "$RESULTS"
RESULTS="$(cd "$RESULTS" && pwd)"
CPU_DRY="${SPO_GPU_CHECK_CPU:-0}"
if [ "$CPU_DRY" = 1 ]; then
    SIZE=gpu-cpu DEFAULT_BUDGET=600 INSTALL_S=60 ENV_S=60 TESTS_S=120
else
    SIZE=gpu DEFAULT_BUDGET=470 INSTALL_S=90 ENV_S=45 TESTS_S=90
fi
BUDGET_S="${GPU_CHECK_BUDGET_S:-$DEFAULT_BUDGET}"
REPORT_S=30
WHEELS="${GPU_CHECK_WHEELS:-$ROOT/bench/wheels}"
PY="${PYTHON:-python3}"
WORK="${GPU_CHECK_WORK:-$(mktemp -d /tmp/spo-gpu-check.XXXXXX)}"
mkdir -p "$WORK"
START=$(date +%s)
LOG="$RESULTS/gpu_check.log"
PHASES="$WORK/phases.tsv"
: > "$LOG"
: > "$PHASES"
rm -f "$RESULTS/$SIZE.json" "$RESULTS/$SIZE.md" "$RESULTS/gpu_tests.log" "$RESULTS/logs.tar.gz"

export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export WANDB_DISABLED=true PYTHONUNBUFFERED=1 HF_DATASETS_DISABLE_PROGRESS_BARS=1
export GPU_CHECK_COMMAND="$([ "$CPU_DRY" = 1 ] && echo "SPO_GPU_CHECK_CPU=1 ")bash bench/gpu_check.sh $*"
status=0

say() { echo "[gpu_check $(( $(date +%s) - START ))s] $*" | tee -a "$LOG"; }
left() { echo $(( BUDGET_S - ($(date +%s) - START) )); }
# phase NAME STATUS SECONDS DETAIL: one line of phases.tsv (read by the report); failed phases fail the script.
phase() {
    printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$(printf '%s' "$4" | tr '\t\n' '  ' | cut -c1-400)" >> "$PHASES"
    say "phase $1: $2 after ${3}s: $4"
    case "$2" in ok|fallback|skipped) ;; *) status=1 ;; esac
}
last_line() { grep -v '^\s*$' "$1" 2>/dev/null | tail -n 1; }
say "work folder $WORK; results to $RESULTS; budget ${BUDGET_S}s; size $SIZE"

# ---------------------------------------------------------------- install (offline)
t0=$(date +%s)
INSTALL_LOG="$WORK/install.log"
: > "$INSTALL_LOG"
wheels=$(ls "$WHEELS"/*.whl 2>/dev/null | wc -l)
if [ "$wheels" -eq 0 ]; then
    phase install "$([ "$CPU_DRY" = 1 ] && echo skipped || echo failed)" 0 \
        "no wheel bundle in $WHEELS (bash bench/gpu_wheels.sh builds it)"
elif [ "$CPU_DRY" = 1 ]; then
    # Not the target Python: check that every wheel would install on CPython 3.12 manylinux x86_64.
    if timeout "$INSTALL_S" "$PY" -m pip install --dry-run --no-deps --no-index --ignore-installed \
        --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --target "$WORK/dry-target" "$WHEELS"/*.whl >> "$INSTALL_LOG" 2>&1; then
        phase install ok $(( $(date +%s) - t0 )) "dry run: the $wheels wheels install on CPython 3.12 manylinux x86_64 (nothing installed)"
    else
        phase install failed $(( $(date +%s) - t0 )) "dry run: $(last_line "$INSTALL_LOG")"
    fi
elif timeout "$INSTALL_S" "$PY" -m pip install --no-index --find-links "$WHEELS" --no-cache-dir --no-compile \
        --progress-bar off "spo-align[train,deepspeed]" >> "$INSTALL_LOG" 2>&1; then
    phase install ok $(( $(date +%s) - t0 )) "$(grep '^Successfully installed' "$INSTALL_LOG" | tail -n 1)"
else
    refused="$(grep -E 'ERROR|error:' "$INSTALL_LOG" | head -n 2 | tr '\n' ' ')"
    left_s=$(( INSTALL_S - ($(date +%s) - t0) ))
    if [ "$left_s" -gt 10 ] && timeout "$left_s" "$PY" -m pip install --no-index --no-deps --upgrade \
            --no-cache-dir --no-compile --progress-bar off "$WHEELS"/*.whl >> "$INSTALL_LOG" 2>&1; then
        phase install fallback $(( $(date +%s) - t0 )) "pip's resolver refused ($refused); every wheel installed with --no-deps"
    elif left_s=$(( INSTALL_S - ($(date +%s) - t0) )); [ "$left_s" -gt 10 ] && timeout "$left_s" "$PY" -m pip \
            install --no-index --no-deps --no-cache-dir --no-compile --progress-bar off --target "$WORK/site" \
            "$WHEELS"/*.whl >> "$INSTALL_LOG" 2>&1; then
        export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
        phase install fallback $(( $(date +%s) - t0 )) "pip's resolver refused ($refused); wheels installed into $WORK/site"
    else
        phase install failed $(( $(date +%s) - t0 )) "$refused; then $(last_line "$INSTALL_LOG")"
    fi
fi
export PYTHONPATH="$ROOT/src:$ROOT${PYTHONPATH:+:$PYTHONPATH}"

# ---------------------------------------------------------------- what this machine is
t0=$(date +%s)
{ nvidia-smi 2>&1 || echo "nvidia-smi: not available"; } >> "$LOG"
if timeout "$ENV_S" "$PY" -m bench env "$WORK/env.json" > "$WORK/env.log" 2>&1; then
    phase env ok $(( $(date +%s) - t0 )) "$("$PY" -c 'import json,sys; t=json.load(open(sys.argv[1]))["torch"]; print(t.get("device_name") or "no CUDA device", "| torch", t.get("version"), "| CUDA", t.get("cuda"))' "$WORK/env.json" 2>&1)"
else
    phase env failed $(( $(date +%s) - t0 )) "$(last_line "$WORK/env.log")"
fi
cuda=0
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" >> "$LOG" 2>&1 && cuda=1

# ---------------------------------------------------------------- tests marked gpu
t0=$(date +%s)
mapfile -t gpu_files < <(grep -rlE --include='test_*.py' '^\s*(@pytest\.mark\.gpu|pytestmark.*pytest\.mark\.gpu)' tests | sort)
if [ "${#gpu_files[@]}" -eq 0 ]; then
    phase gpu-tests skipped 0 "no test file holds a test marked gpu"
else
    timeout -s INT -k 10 "$TESTS_S" "$PY" -m pytest -m gpu -q -p no:cacheprovider -rfEs "${gpu_files[@]}" \
        > "$RESULTS/gpu_tests.log" 2>&1
    rc=$?
    summary="$(last_line "$RESULTS/gpu_tests.log")"
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
        phase gpu-tests timeout $(( $(date +%s) - t0 )) "stopped at ${TESTS_S}s: $summary"
    elif [ $rc -eq 0 ] && [[ "$summary" == *passed* ]]; then
        phase gpu-tests ok $(( $(date +%s) - t0 )) "$summary"
    elif [ $rc -eq 0 ] && [ "$cuda" -eq 0 ]; then
        phase gpu-tests skipped $(( $(date +%s) - t0 )) "no CUDA device: $summary"
    else
        phase gpu-tests failed $(( $(date +%s) - t0 )) "exit $rc: $summary"
    fi
fi

# ---------------------------------------------------------------- the bench
t0=$(date +%s)
budget=$(( $(left) - REPORT_S ))
if [ "$cuda" -eq 0 ] && [ "$CPU_DRY" != 1 ]; then
    phase bench failed 0 "no CUDA device: the bench is not run on this machine's CPU at GPU size"
elif [ "$budget" -lt 60 ]; then
    phase bench skipped 0 "only ${budget}s left"
else
    say "bench: python -m bench run --size $SIZE --budget-s $budget"
    timeout -s INT -k 15 $(( budget + 20 )) "$PY" -m bench run --size "$SIZE" --work-dir "$WORK" \
        --results-dir "$RESULTS" --budget-s "$budget" > "$WORK/bench.log" 2>&1
    rc=$?
    grep -E "INFO bench|ERROR|round [0-9]" "$WORK/bench.log" | tail -n 40 >> "$LOG"
    case $rc in
        0) phase bench ok $(( $(date +%s) - t0 )) "runs: see the report" ;;
        124|130|137) phase bench timeout $(( $(date +%s) - t0 )) "stopped at its budget; the report holds the runs that ended" ;;
        *) phase bench failed $(( $(date +%s) - t0 )) "exit $rc: $(last_line "$WORK/bench.log")" ;;
    esac
fi

# ---------------------------------------------------------------- report and logs
if timeout "$REPORT_S" "$PY" -m bench gpu-report --size "$SIZE" --work-dir "$WORK" --results-dir "$RESULTS" \
        --command "$GPU_CHECK_COMMAND" > "$WORK/report.log" 2>&1; then
    say "report written: $RESULTS/$SIZE.md"
else
    rc=$?
    [ $rc -eq 3 ] && say "report written; some runs did not succeed (see $RESULTS/$SIZE.md)" || {
        say "the report could not be built (exit $rc): $(last_line "$WORK/report.log")"
        {
            echo "# GPU check: the report could not be built"
            echo
            echo "\`python -m bench gpu-report\` exited with $rc: $(last_line "$WORK/report.log")"
            echo
            echo "## Phases (name, status, seconds, detail)"
            echo
            sed 's/^/    /' "$PHASES"
        } > "$RESULTS/$SIZE.md"
        printf '{"kind": "gpu-check", "size": "%s", "report_error": "python -m bench gpu-report exited with %s"}\n' \
            "$SIZE" "$rc" > "$RESULTS/$SIZE.json"
    }
    status=1
fi
( cd "$WORK" && tar -czf "$RESULTS/logs.tar.gz" --ignore-failed-read phases.tsv install.log env.json env.log \
    bench.log report.log raw.json jobs 2>/dev/null )
# The report last, so that the end of the output (all a remote run may return) holds it.
cat "$RESULTS/$SIZE.md"
say "done in $(( $(date +%s) - START ))s, exit $status; $RESULTS: $(ls "$RESULTS" | tr '\n' ' ')"
exit $status
