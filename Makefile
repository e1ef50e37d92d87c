# genloop: two commands on a fresh machine.
#   make demo   the main job, end to end, on the embedded defaults
#   make test   lint (ruff), format check, types (mypy), tests (pytest)
# and for maintainers:
#   make lock          re-resolve requirements.lock (newest versions within pyproject's ranges)
#   make test-latest   the whole gate on the newest versions, unlocked (scheduled in CI)
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
DEMO_HOME ?= genloop-workspace
LOCK := requirements.lock
# Where pip finds the CPU build of torch (pip's own find-links, or PyTorch's CPU index via
# PIP_EXTRA_INDEX_URL); `make lock` passes it to uv, which reads no pip configuration.
TORCH_FIND_LINKS ?= $(shell $(PYTHON) -m pip config get global.find-links 2>/dev/null)
LATEST := .venv-latest

.PHONY: install demo test lint typecheck pytest bench clean lock test-latest

# Development, CI and the demo install exactly the locked set (every file's hash checked);
# pyproject.toml keeps ranges for the library's users.
$(STAMP): pyproject.toml $(LOCK) setup.py src/genloop/data/_bpe.c
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet --require-hashes --no-deps -r $(LOCK)
	# genloop itself (editable; compiles the BPE extension) with the locked setuptools
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e .
	$(BIN)/pip check
	# the web UI tests drive Debian's chromium (apt-get; no browser download)
	bash scripts/install-browser.sh
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	GENLOOP_HOME=$(DEMO_HOME) bash scripts/demo.sh

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

typecheck: $(STAMP)
	$(BIN)/mypy

# Tests run on PYTEST_WORKERS processes (pytest-xdist), a module's tests together so that
# its shared fixtures are built once; PYTEST_WORKERS=0 runs them in this process.
PYTEST_WORKERS ?= 2
pytest: $(STAMP)
	$(BIN)/pytest -q -n $(PYTEST_WORKERS) --dist loadscope

test: lint typecheck pytest

bench: $(STAMP)
	for b in benchmarks/bench_*.py; do $(BIN)/python $$b --quick || exit 1; done

# One command refreshes the lock: the newest releases pyproject.toml allows, for CPython
# 3.11 on x86_64 Linux, torch held at the CPU build of 2.13.0 (constraints.txt).
lock:
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	test -x $(BIN)/uv || $(BIN)/pip install --quiet uv
	$(BIN)/uv pip compile pyproject.toml --extra dev --generate-hashes --upgrade \
	  --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
	  $(addprefix --find-links ,$(TORCH_FIND_LINKS)) \
	  --constraint constraints.txt --custom-compile-command 'make lock' --output-file $(LOCK)

# The newest versions, unlocked, in their own virtual environment: drift shows up here (a
# scheduled job) before it reaches the lock.
test-latest:
	test -x $(LATEST)/bin/python || $(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install --quiet --upgrade pip
	$(LATEST)/bin/pip install --quiet -c constraints.txt torch==2.13.0
	$(LATEST)/bin/pip install --quiet --upgrade --upgrade-strategy eager -c constraints.txt -e '.[dev]'
	bash scripts/install-browser.sh
	touch $(LATEST)/.installed-stamp
	$(MAKE) test BIN=$(LATEST)/bin STAMP=$(LATEST)/.installed-stamp

clean:
	rm -rf $(VENV) $(LATEST) .pytest_cache .mypy_cache .ruff_cache
