#!/usr/bin/env bash
# Fetch, on a machine with PyPI access, the wheels bench/gpu_check.sh installs offline on a GPU machine
# whose image has torch, accelerate, tokenizers, safetensors, typer, rich and PyYAML but not the rest of
# what the project and its tests pin (versions below: the ones the CPU bench and the test suite ran with).
#
#   bash bench/gpu_wheels.sh [DEST] [PYTHON_VERSION]      (defaults: .whl, 3.12)
#
# DEST should be git-ignored (e.g. `echo /.whl/ >> .git/info/exclude`); the wheels total about 20 MB.
# flash-attn is not fetched: PyPI has its source only, so flash_attention_2 runs only where the GPU
# machine's image already has it (the check then lists it as skipped).
set -euo pipefail
DEST="${1:-.whl}"
PYVER="${2:-3.12}"
WHEELS=(
    transformers==5.24.0
    trl==1.16.0
    datasets==5.2.0
    peft==0.21.2
    huggingface_hub==2.4.0
    fsspec==2026.9.0
    dill==0.4.1
    multiprocess==0.70.19
    pydantic==2.13.4
    pydantic_core==2.46.4
    annotated-types==0.7.0
    typing-inspection==0.4.2
)
mkdir -p "$DEST"
python3 -m pip download --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$DEST" "${WHEELS[@]}"
ls -la "$DEST"
