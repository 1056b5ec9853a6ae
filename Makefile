# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: demo test test-fast lint docs bench bench-deps gpu-check clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install -q -e '.[dev]'
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m experiments.demo

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

# Test files are spread over the cores (pytest-xdist; one file stays on one worker, so its
# module fixtures are built once), in the order tests/conftest.py gives them (xdist would
# otherwise queue the files with the most tests first, and the one-test tutorials last).
PYTEST_WORKERS := -n auto --maxprocesses 4 --dist loadfile --no-loadscope-reorder

test: $(STAMP) lint
	$(PY) -m pytest -q $(PYTEST_WORKERS)

# The API reference from the docstrings, offline; a warning is an error (tests/test_docs.py
# builds it too, so `make test` checks it).
docs: $(STAMP)
	$(PY) -m sphinx -E -W --keep-going -q -b html docs/api docs/_build

# Inner loop: skips the few slow end-to-end tests (CI still runs them through `make test`).
test-fast: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_WORKERS) -m "not slow"

bench-deps: $(STAMP)
	$(PY) -m pip install -q -e '.[dev,bench]'

bench: bench-deps
	$(PY) -m experiments.bench.maml_torch
	$(PY) -m experiments.bench.scan_mambapy

# One-call GPU check (issue #14; README.md, "GPU"): every section in its own process under its
# own timeout, within about 8 minutes; results in $(GPU_CHECK_OUT)/gpu_check.{json,log}. Without
# a GPU it runs the same sections at tiny sizes (Pallas interpret mode). On a machine whose
# Python already has the dependencies (a GPU image): `make gpu-check PY=python3`.
GPU_CHECK_OUT ?= runs/gpu_check

gpu-check: $(if $(filter $(VENV)/bin/python,$(PY)),$(STAMP))
	PYTHONPATH=.$${PYTHONPATH:+:$$PYTHONPATH} $(PY) -m experiments.gpu_check --out $(GPU_CHECK_OUT)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache docs/_build
