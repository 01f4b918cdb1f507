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

.PHONY: all build test bench clean

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

clean:
	rm -rf build *.egg-info condkernels/*.so $(BUILD_STAMP)
