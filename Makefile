# Two commands on a fresh machine: `make demo` and `make test`. Each does its own set-up
# (a .venv in the repo with pinned dependencies, the build) and is safe to re-run.
PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.deps-stamp
# torch 2.13.0 is the CPU wheel on this machine's disk (FACTS.md); the rest are pinned for
# repeatable runs.
DEPS    := torch==2.13.0 numpy==2.4.6 pytest==9.2.0 scikit-learn==1.9.1 matplotlib==3.11.2 \
           pybind11==3.1.0 setuptools==84.2.1 wheel==0.48.0 ninja==1.13.2 cmake==3.31.10 \
           nvidia-cuda-cuobjdump==13.2.51 nvidia-cuda-nvdisasm==13.2.51 triton==3.9.0
SOURCES := $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh') setup.py
SO_STAMP := $(VENV)/.build-stamp
CMAKE_BUILD := build/cmake
# A CUDA build of torch (the cu13 wheel on this machine's disk, FACTS.md) to build the full
# extension against: CUDA compiles and links here, nothing runs.
CUDA_VENV  := .venv-cuda
CUDA_STAMP := $(CUDA_VENV)/.deps-stamp
CUDA_DEPS  := torch==2.14.1 numpy==2.4.6 pybind11==3.1.0 setuptools==84.2.1 wheel==0.48.0 \
              ninja==1.13.2

.PHONY: all venv build test pytest cmake-test cuda-ext-check gpu-check demo bench clean

all: build

$(STAMP): Makefile
	$(PY) -m venv $(VENV)
	$(VPY) -m pip install -q $(DEPS)
	touch $@

venv: $(STAMP)

# --no-build-isolation: build against the torch in .venv (FACTS.md: isolation pulls another torch).
$(SO_STAMP): $(STAMP) $(SOURCES)
	$(VPY) -m pip install -q --no-build-isolation -e .
	touch $@

build: $(SO_STAMP)

test: pytest cmake-test cuda-ext-check

pytest: build
	$(VPY) -m pytest -q tests

cmake-test: $(STAMP)
	$(VPY) tools/cmake_test.py $(CMAKE_BUILD)

$(CUDA_STAMP): Makefile
	$(PY) -m venv $(CUDA_VENV)
	$(CUDA_VENV)/bin/python -m pip install -q $(CUDA_DEPS)
	touch $@

cuda-ext-check: $(CUDA_STAMP)
	$(CUDA_VENV)/bin/python tools/cuda_ext_check.py

# On a machine with a GPU (its python3 has a CUDA torch, nvcc, compute-sanitizer; no downloads).
gpu-check:
	bash tools/gpu_check.sh

# The demo (training side by side, convergence, loss PNG) and then `bench --quick`; files go
# to ./momentum-cuda-out (git-ignored).
demo: build
	$(VPY) -m momentum_cuda demo

# The full benchmark on this machine's CPU (or its GPU); results are meant to be committed.
bench: build
	$(VPY) -m momentum_cuda bench --out benchmarks/results

clean:
	rm -rf build $(VENV) $(CUDA_VENV) momentum_cuda/*.so *.egg-info
