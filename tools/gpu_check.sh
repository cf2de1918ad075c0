#!/usr/bin/env bash
# The GPU check (tools/gpu_check.py): `bash tools/gpu_check.sh` on a GPU machine, where `make`
# may be missing; `bash tools/gpu_check.sh --dry` anywhere. PY picks the interpreter (default
# python3: on the rented machine, the one with its CUDA torch). Evidence goes to $OUT when set,
# else benchmarks/results/gpu-<date>/.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PY:-python3}" -u tools/gpu_check.py "$@"
