# Two commands on a fresh machine: `make demo` and `make test`. Each does its own set-up
# (a .venv in the repo with pinned dependencies, the build) and is safe to re-run.
PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.deps-stamp
# torch 2.13.0: a CPU build (the tests run on it); the rest are pinned for repeatable runs.
DEPS    := torch==2.13.0 numpy==2.4.6 pytest==9.2.0 scikit-learn==1.9.1 matplotlib==3.11.2 \
           pybind11==3.1.0 setuptools==84.2.1 wheel==0.48.0 ninja==1.13.2 cmake==3.31.10 \
           nvidia-cuda-cuobjdump==13.2.51 nvidia-cuda-nvdisasm==13.2.51 triton==3.9.0 \
           hypothesis==6.155.2 pytest-xdist==3.8.0
SOURCES := $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh' -o -name '*.json') setup.py
SO_STAMP := $(VENV)/.build-stamp
CMAKE_BUILD := build/cmake
# The GPU machine's versions (Python 3.12, torch 2.11.0+cu130, triton 3.6.0, which torch pins):
# the GPU check's dry run builds the full extension (CPU + CUDA kernels) against them, imports
# it and collects the GPU tests. CUDA compiles and links here; nothing CUDA runs.
PY312      ?= $(firstword $(wildcard /root/.pyenv/versions/3.12*/bin/python3.12) \
                          $(shell command -v python3.12))
GPU_VENV   := .venv-gpu
GPU_VPY    := $(GPU_VENV)/bin/python
GPU_STAMP  := $(GPU_VENV)/.deps-stamp
GPU_DEPS   := torch==2.11.0 numpy==2.4.6 pytest==9.2.0 pybind11==3.1.0 setuptools==81.0.0 \
              wheel==0.48.0 ninja==1.13.2 matplotlib==3.11.2

.PHONY: all venv build test test-long pytest cmake-test gpu-check gpu-check-dry demo bench clean

all: build

$(STAMP): Makefile
	$(PY) -m venv $(VENV)
	$(VPY) -m pip install -q $(DEPS)
	touch $@

venv: $(STAMP)

# --no-build-isolation: build against the torch in .venv (an isolated build pulls another torch
# and its headers: docs/numerics.md).
$(SO_STAMP): $(STAMP) $(SOURCES)
	$(VPY) -m pip install -q --no-build-isolation -e .
	touch $@

build: $(SO_STAMP)

test: pytest cmake-test gpu-check-dry

# Two workers (CI has 2 cores), each taking whole files, so that a file's module fixtures (the
# builds, the interpreter and distributed children) are made once.
PYTEST_WORKERS ?= 2
pytest: build
	$(VPY) -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile tests

# The randomized operation sequences of tests/test_sequences.py, 10,000 of them instead of the
# default run's 1,000.
test-long: build
	MOMENTUM_CUDA_SEQUENCES=10000 $(VPY) -m pytest -q tests/test_sequences.py

cmake-test: $(STAMP)
	$(VPY) tools/cmake_test.py $(CMAKE_BUILD)

$(GPU_STAMP): Makefile
	@test -n "$(PY312)" || { echo "make: no python3.12 found (set PY312=...)" >&2; exit 1; }
	$(PY312) -m venv $(GPU_VENV)
	$(GPU_VPY) -m pip install -q $(GPU_DEPS)
	touch $@

# On a machine with a GPU (its python3 has a CUDA torch, nvcc, compute-sanitizer; no downloads):
# staged, under a 9-minute deadline, evidence in $$OUT or benchmarks/results/gpu-<date>/.
gpu-check:
	bash tools/gpu_check.sh

# The same script without a GPU (part of `make test`): every stage in its dry form, run with the
# GPU machine's Python, torch and triton; its files land in build/gpu-check-dry, emptied first
# (as $OUT is on the GPU machine: the file-count check must not count an older run's files).
gpu-check-dry: $(GPU_STAMP)
	rm -rf build/gpu-check-dry
	PY=$(GPU_VPY) bash tools/gpu_check.sh --dry --out build/gpu-check-dry

# The demo (training side by side, convergence, loss PNG) and then `bench --quick`; files go
# to ./momentum-cuda-out (git-ignored).
demo: build
	$(VPY) -m momentum_cuda demo

# The full benchmark on this machine's CPU (or its GPU); results are meant to be committed.
bench: build
	$(VPY) -m momentum_cuda bench --out benchmarks/results

clean:
	rm -rf build $(VENV) $(GPU_VENV) momentum_cuda/*.so *.egg-info
