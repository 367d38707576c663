#!/usr/bin/env bash
# One prepared GPU check (under 10 minutes on an H200): the kernel tests compiled for the GPU
# (no interpreter, bf16 included), the kernel benchmarks and the scale run, results as JSON in $OUT (or
# benchmarks/results/gpu). Usage on a CUDA machine with the project installed:
#   bash benchmarks/gpu_check.sh
set -uo pipefail
out="${OUT:-benchmarks/results/gpu}"
mkdir -p "$out"
export EFX_KERNELS=triton TRITON_INTERPRET=0 EFX_TEST_DEVICE=cuda PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$out/gpu.csv" 2>&1
timeout 240 python -m pytest -q -p no:cacheprovider tests/test_kernels_pruning.py tests/test_kernels_sparse_lora.py \
    --junitxml="$out/kernel_tests.xml" 2>&1 | tail -n 30 | tee "$out/kernel_tests.log"
timeout 150 python benchmarks/kernel_bench.py --output "$out" 2>&1 | tail -n 60 | tee "$out/bench.log"
# the scale run on the GPU: calls on narrow and 8B-shaped models up to 32 layers, and an 8B `efx run`
EFX_KERNELS=auto timeout 180 python benchmarks/scale.py --device cuda --output "$out" 2>&1 | tail -n 20 | tee "$out/scale.log"
