#!/usr/bin/env bash
# `make gpu-check`: the one-command check on a machine WITH a GPU (python3 there has torch with
# CUDA, nvcc and compute-sanitizer; nothing can be downloaded). Builds in place, runs the GPU
# tests, compute-sanitizer memcheck and racecheck on the kernels, the step benchmark, and writes
# benchmarks/results/gpu-check-<date>.txt with the device, driver, versions and commit.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
stamp=$(date -u +%Y%m%d-%H%M%S)
out=benchmarks/results/gpu-check-$stamp.txt
mkdir -p benchmarks/results
status=0
step() { echo; echo "== $*" | tee -a "$out"; }
{
  echo "date: $(date -u +%FT%TZ)"
  echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | sed 's/^/gpu: /'
  $PY -c "import torch; print('torch:', torch.__version__, 'cuda', torch.version.cuda)"
  nvcc --version | tail -1
} | tee "$out"

step "build (setup.py build_ext --inplace)"
$PY setup.py build_ext --inplace 2>&1 | tail -3 | tee -a "$out" || status=1

step "GPU tests (tests/test_gpu.py) and the CUDA evidence suite"
$PY -m pytest -q tests/test_gpu.py tests/test_cuda_host.py tests/test_cuda_build.py tests/test_triton_aot.py 2>&1 | tail -15 | tee -a "$out"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

step "torch's CUDA add_: FMA or mul-then-add? (which hypothesis holds)"
$PY tools/gpu_rounding_probe.py 2>&1 | tee -a "$out" || status=1

for tool in memcheck racecheck; do
  step "compute-sanitizer --tool $tool"
  compute-sanitizer --tool $tool --error-exitcode 1 $PY tools/gpu_smoke.py 2>&1 | tail -5 | tee -a "$out"
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
done

step "device-to-device copy bandwidth (the flat step should reach >= 90 % of it)"
$PY tools/gpu_bandwidth.py 2>&1 | tee -a "$out" || status=1

step "step benchmark: every implementation, 4 layouts, fp32 and bf16, 1M-100M params (CUDA events, CUDA graphs up to 10M)"
$PY -m momentum_cuda bench --device cuda --params 1M 10M 100M --out benchmarks/results 2>&1 | tail -80 | tee -a "$out"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

step "step benchmark at 1B params (few large tensors; fewer implementations, to fit in memory)"
$PY -m momentum_cuda bench --device cuda --params 1B --layouts few-large --impls mc-flat-cuda torch-foreach torch-fused --out benchmarks/results 2>&1 | tail -30 | tee -a "$out"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

step "result: $([ $status -eq 0 ] && echo PASS || echo FAIL)"
echo "written: $out"
exit $status
