# Two commands do everything on a fresh machine:
#   make bench   -- virtual environment, pinned dependencies, build, then the benchmark runner's quick
#                   suite (every op and the networks), report written to docs/benchmarks.md
#   make test    -- the same set-up, then the whole test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
JOBS ?= 2
DEPS_STAMP := $(VENV)/.deps-installed
BUILD_STAMP := $(VENV)/.condkernels-built
SOURCES := $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh') setup.py

.PHONY: all build test bench clean gpu-build gpu-test gpu-bench

all: build

$(DEPS_STAMP): requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

$(BUILD_STAMP): $(DEPS_STAMP) $(SOURCES)
	MAX_JOBS=$(JOBS) $(PY) -m pip install --quiet --no-build-isolation --no-deps -e .
	touch $@

build: $(BUILD_STAMP)

test: build
	$(PY) -m pytest python_tests -q -ra

# BENCH_ARGS: more options of the runner, e.g. BENCH_ARGS="--full --threads 2" (see --help).
BENCH_ARGS ?=

bench: build
	$(PY) -m condkernels.bench --out docs $(BENCH_ARGS)

# On a CUDA machine whose Python already holds a CUDA build of torch (GPU_PYTHON; no virtual
# environment, nothing downloaded): build in place with the CUDA kernels for the visible GPU, run the
# tests that use it (the CUDA backend and Triton compiled for the GPU), time every suite on it.
# gpu-bench merges its rows, after every case, into a copy of docs' results in GPU_OUT
# (results/benchmarks.json and the report beside it; a run cut short keeps the cases it finished);
# copy that JSON over docs/results/ and rebuild with --report-only.
GPU_PYTHON ?= python3
GPU_OUT ?= gpu-results
GPU_BENCH_ARGS ?=

gpu-build:
	CONDKERNELS_CUDA=1 MAX_JOBS=$$(nproc) $(GPU_PYTHON) setup.py --quiet build_ext --inplace

# With pytest-xdist, 8 test processes: the first call of each Triton kernel compiles it, on one core.
# The checks made for machines without a GPU (Triton compile check, emulated CUDA) are left to CI.
gpu-test: gpu-build
	mkdir -p $(GPU_OUT)
	$(GPU_PYTHON) -m pytest python_tests -q -ra -k "(cuda or triton) and not gpu_compile and not emulated" \
		--junit-xml=$(GPU_OUT)/tests.xml $$($(GPU_PYTHON) -c "import xdist; print('-n 8')" 2>/dev/null)

gpu-bench: gpu-build
	mkdir -p $(GPU_OUT)/results
	cp docs/results/benchmarks.json $(GPU_OUT)/results/
	$(GPU_PYTHON) -m condkernels.bench --device cuda --out $(GPU_OUT) $(GPU_BENCH_ARGS)

clean:
	rm -rf build *.egg-info condkernels/*.so $(BUILD_STAMP)
