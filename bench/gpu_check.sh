#!/usr/bin/env bash
# GPU check (issue 7): one script, under 8 minutes on one H100, no network.
#
#   bash bench/gpu_check.sh [RESULTS_DIR]        (from anywhere; default RESULTS_DIR: bench/results/gpu)
#
# 1. installs carried wheels offline, if any (WHEELHOUSE, default .whl/; see bench/gpu_wheels.sh), and the
#    project itself (no dependencies, no index);
# 2. runs the tests marked `gpu`;
# 3. runs `python -m bench run --size gpu`: full fine-tuning of a random-weight model with Qwen2.5-1.5B's
#    shape in bf16, packed SPO under sdpa, flex_attention and flash_attention_2 (each where it imports),
#    packed SPO with precomputed reference log-probs, and TRL's DPOTrainer under each kernel as the
#    baseline; real tokens/s, MFU (6 N per trained token + 2 N per live-reference token, over the card's
#    dense bf16 peak), padding share and peak GPU memory, written as gpu.json / gpu.md.
# Every phase has its own time limit inside a total budget (GPU_CHECK_BUDGET_S, default 450 s), and the
# bench stops starting runs when its share is spent, so the script ends with a report even when a kernel
# hangs or fails. Exit status: 0 when the tests passed (or none are marked gpu) and every bench run
# produced figures; 1 otherwise (the report says which run failed and why).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
RESULTS_DIR="${1:-bench/results/gpu}"
WHEELHOUSE="${WHEELHOUSE:-.whl}"
BUDGET_S="${GPU_CHECK_BUDGET_S:-450}"
TESTS_LIMIT_S="${GPU_CHECK_TESTS_S:-120}"
PY="${PYTHON:-python3}"
SITE="${SPO_GPU_SITE:-/tmp/spo-gpu-site}"
START=$(date +%s)
mkdir -p "$RESULTS_DIR"
LOG="$RESULTS_DIR/gpu_check.log"
: > "$LOG"

export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export WANDB_DISABLED=true PYTHONUNBUFFERED=1 HF_DATASETS_DISABLE_PROGRESS_BARS=1

say() { echo "[gpu_check $(( $(date +%s) - START ))s] $*" | tee -a "$LOG"; }
left() { echo $(( BUDGET_S - ($(date +%s) - START) )); }

# ---------------------------------------------------------------- 1. packages (offline)
if compgen -G "$WHEELHOUSE/*.whl" > /dev/null; then
    say "installing $(ls "$WHEELHOUSE"/*.whl | wc -l) carried wheels from $WHEELHOUSE into $SITE"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        "$WHEELHOUSE"/*.whl >> "$LOG" 2>&1 || { say "wheel install failed (see $LOG)"; exit 1; }
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
if "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target "$SITE/project" . >> "$LOG" 2>&1; then
    export PYTHONPATH="$SITE/project:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
    export PATH="$SITE/project/bin:$PATH"
else
    say "could not install the project as a package; importing it from src/ instead"
    export PYTHONPATH="$ROOT/src:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
fi

# ---------------------------------------------------------------- 2. what this machine is
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$LOG" \
    | tee "$RESULTS_DIR/device.txt"
"$PY" - <<'EOF' 2>&1 | tee -a "$LOG" | tee "$RESULTS_DIR/versions.txt"
import importlib, importlib.util
import torch
print("cuda available:", torch.cuda.is_available(), "| device:", torch.cuda.get_device_name() if torch.cuda.is_available() else None)
for name in ("torch", "transformers", "trl", "accelerate", "datasets", "peft", "flash_attn", "deepspeed", "spo_align"):
    spec = importlib.util.find_spec(name)
    version = getattr(importlib.import_module(name), "__version__", "?") if spec else "not importable"
    print(f"{name}: {version}")
EOF
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    say "no CUDA device: the GPU check is not run here"
    exit 1
fi

# ---------------------------------------------------------------- 3. tests marked gpu
status=0
say "tests marked gpu (limit ${TESTS_LIMIT_S}s)"
timeout --signal=INT "$TESTS_LIMIT_S" "$PY" -m pytest -m gpu -q -p no:cacheprovider tests \
    > "$RESULTS_DIR/gpu_tests.log" 2>&1
rc=$?
tail -n 15 "$RESULTS_DIR/gpu_tests.log" | tee -a "$LOG"
case $rc in
    0) say "gpu tests passed" ;;
    5) say "no test is marked gpu: nothing to run" ;;
    124) say "gpu tests hit the ${TESTS_LIMIT_S}s limit"; status=1 ;;
    *) say "gpu tests failed (exit $rc)"; status=1 ;;
esac

# ---------------------------------------------------------------- 4. throughput and MFU
budget=$(( $(left) - 15 ))
if [ "$budget" -lt 60 ]; then
    say "only ${budget}s left: MFU runs skipped"
    exit 1
fi
say "MFU runs (budget ${budget}s)"
"$PY" -m bench run --size gpu --parts preference --budget-s "$budget" \
    --work-dir "${SPO_GPU_WORK:-/tmp/spo-gpu-bench}" --results-dir "$RESULTS_DIR" 2>&1 | tee -a "$LOG" | tail -n 30
rc=${PIPESTATUS[0]}
if [ "$rc" -ne 0 ]; then
    say "bench exited with $rc"
    status=1
elif grep -q "failed:" "$RESULTS_DIR/gpu.md"; then
    say "some runs failed: see $RESULTS_DIR/gpu.md"
    status=1
fi
say "done in $(( $(date +%s) - START ))s; results in $RESULTS_DIR (gpu.md, gpu.json, gpu_tests.log, gpu_check.log)"
exit $status
