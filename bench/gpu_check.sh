#!/usr/bin/env bash
# The device check of nvfp4kit's GPU path, in one command (under 8 minutes on one H100/H200-class GPU):
# the CUDA test subset, bench/kernels.py's bandwidth table (8192x8192 bf16 vs a device copy), training step
# time of BF16 vs the nemotron3 recipe vs all-NVFP4 (hidden 2048), and PTQ calibration tokens/s on the GPU,
# written as the `gpu-check` section of bench/RESULTS.md with the device's name (bench/gpu_check.py).
#
#   bench/gpu_check.sh                 # on a GPU machine that has only this repository
#   bench/gpu_check.sh --dry-run       # any machine: the same steps on the CPU, tiny sizes, into a temp file
#
# Installing: when the interpreter already has torch, triton and the other runtime packages (a GPU image
# without a package index, for instance), the project is installed without dependencies (or put on
# PYTHONPATH when even that cannot be done); otherwise `pip install "torch==2.13.0" -e ".[test]"` (on a
# Linux GPU machine that torch wheel is the CUDA build). PYTHON picks the interpreter (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1

if ! "$PY" -c "import torch, triton, numpy, safetensors, typer, rich, transformers, tokenizers, pytest, hypothesis" \
        >/dev/null 2>&1; then
    echo "[gpu-check] installing torch==2.13.0 and nvfp4kit[test] ..."
    "$PY" -m pip install -q "torch==2.13.0" -e ".[test]"
elif ! "$PY" -c "import nvfp4kit, sys; sys.exit(0 if nvfp4kit.__file__.startswith('$PWD') else 1)" >/dev/null 2>&1; then
    echo "[gpu-check] using the installed torch; installing nvfp4kit from this checkout (no dependencies) ..."
    "$PY" -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || {
        echo "[gpu-check] pip could not install the checkout; using PYTHONPATH=$PWD"
        export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
    }
fi

if [[ " $* " != *" --dry-run "* ]]; then
    command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
fi
exec "$PY" bench/gpu_check.py "$@"
