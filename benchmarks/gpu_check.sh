#!/usr/bin/env bash
# One prepared GPU check (under 10 minutes on an H200), everything in one JSON,
# $OUT/gpu_check.json (or benchmarks/results/gpu/gpu_check.json):
#   1. the kernel tests compiled for the GPU (no interpreter, bf16 included, every tile family);
#   2. the kernel benchmark: decode (M 1, 4, 16) and prefill (M 2048) at Llama-3-8B shapes, r 16,
#      dense cuBLAS + unfused LoRA against each fused format; the fused ForeSight score's GB/s;
#      every kept autotune config timed beside its static-check record;
#   3. the scale run (pruning calls on narrow and 8B-shaped models, an 8B-shaped `efx run`).
# Usage on a CUDA machine with the project installed:  bash benchmarks/gpu_check.sh
set -uo pipefail
out="${OUT:-benchmarks/results/gpu}"
mkdir -p "$out"
export EFX_KERNELS=triton TRITON_INTERPRET=0 EFX_TEST_DEVICE=cuda PYTHONUNBUFFERED=1
started=$(date +%s)
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$out/gpu.csv" 2>&1
timeout 180 python -m pytest -q -p no:cacheprovider tests/test_kernels_pruning.py tests/test_kernels_sparse_lora.py \
    --junitxml="$out/kernel_tests.xml" > "$out/kernel_tests.log" 2>&1
echo "kernel tests: rc $? after $(( $(date +%s) - started )) s"; tail -n 3 "$out/kernel_tests.log"
EFX_KERNELS=auto timeout 200 python benchmarks/kernel_bench.py --output "$out" > "$out/bench.log" 2>&1
echo "kernel bench: rc $? after $(( $(date +%s) - started )) s"; tail -n 3 "$out/bench.log"
EFX_KERNELS=auto timeout 150 python benchmarks/scale.py --device cuda --output "$out" > "$out/scale.log" 2>&1
echo "scale: rc $? after $(( $(date +%s) - started )) s"; tail -n 3 "$out/scale.log"
python - "$out" <<'PY'
import glob, json, os, sys, xml.etree.ElementTree as ET
out = sys.argv[1]
report = {"gpu": open(os.path.join(out, "gpu.csv")).read().strip().splitlines()[-1:]}
try:
    suite = ET.parse(os.path.join(out, "kernel_tests.xml")).getroot().find("testsuite")
    report["kernel_tests"] = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    report["kernel_tests"]["seconds"] = float(suite.get("time", 0))
except (OSError, ET.ParseError, AttributeError) as err:
    report["kernel_tests"] = {"error": str(err)}
for path in sorted(glob.glob(os.path.join(out, "*.json"))):
    if not path.endswith("gpu_check.json"):
        with open(path) as f:
            report[os.path.basename(path)[:-5]] = json.load(f)
with open(os.path.join(out, "gpu_check.json"), "w") as f:
    json.dump(report, f, indent=1)
print("wrote", os.path.join(out, "gpu_check.json"))
PY
echo "total $(( $(date +%s) - started )) s"
