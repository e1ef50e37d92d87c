# genloop: two commands on a fresh machine.
#   make demo   the main job, end to end, on the embedded defaults
#   make test   lint (ruff), format check, types (mypy), tests (pytest)
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
DEMO_HOME ?= genloop-workspace

.PHONY: install demo test lint typecheck pytest bench clean

$(STAMP): pyproject.toml constraints.txt src/genloop/data/_bpe.c
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first and pinned: the CPU build, never a multi-GB CUDA download
	$(BIN)/pip install --quiet -c constraints.txt torch==2.13.0
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
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

pytest: $(STAMP)
	$(BIN)/pytest -q

test: lint typecheck pytest

bench: $(STAMP)
	for b in benchmarks/bench_*.py; do $(BIN)/python $$b --quick || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
