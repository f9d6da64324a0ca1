#!/usr/bin/env bash
# Issue #16's GPU checks in one call on a lent device (about 5 minutes on an H200).
#
# Prepare here (both paths are git-ignored; they travel only when carried):
#   pip download --no-deps --only-binary=:all: -d .whl higher==0.2.1
#   pip download --only-binary=:all: --python-version 3.12 -d .whl pytest   # and its deps
#   mkdir -p .gpudata/omniglot && cp PATH/TO/omniglot/images_{background,evaluation}.zip .gpudata/omniglot/
# Run there, from the repository root, with .whl and .gpudata carried:
#   bash benchmarks/gpu_check.sh
# It writes its reports under $OUT (or ./gpu-check where $OUT is unset): the GPU's name, the
# CUDA and Triton tests of the drop-in step, the drop-in step at 10M and 100M parameters against
# its state's copy time with the Triton kernel's launch shapes, and the default optimizer on a
# model of 256 tensors in one launch against one launch a tensor and fused Adam (step_gpu.py),
# and the
# 5-way 1-shot T = 12 meta-step, first and second order (meta_train.py; target: first order
# >= 3x faster than the 77 ms of docs/results/meta_train_cuda.md on an H200).
set -uo pipefail
out=${OUT:-gpu-check}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH="/tmp/site:$PWD"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__)" | tee -a "$out/gpu.txt"
python3 -c "import triton; print('triton', triton.__version__)" 2>&1 | tee -a "$out/gpu.txt"
# The CUDA tests and the Triton refusals' CUDA half; the Triton interpreter's checks and the
# ahead-of-time compile are the CPU's (they would spend device time proving nothing new).
python3 -m pytest -q -o addopts="" -p no:cacheprovider -k "cuda or triton_step_refuses" \
    tests/test_triton_step.py tests/test_optimizer.py tests/test_train.py \
    tests/test_rule_trajectory.py 2>&1 | tail -8 | tee "$out/cuda_tests.txt"
python3 benchmarks/step_gpu.py --sizes 10M,100M --triton-shapes 32x2,64x2,64x4,128x4,128x8 2>&1 \
    | tee "$out/step_gpu.txt"
python3 benchmarks/meta_train.py --data-root .gpudata/omniglot --device cuda --rounds 7 \
    --json "$out/meta_train_cuda.json" --markdown "$out/meta_train_cuda.md" 2>&1 \
    | tee "$out/meta_train_cuda.txt"
