# laud_jax: set-up, demo, tests and benchmarks. Every target creates .venv when missing.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_WORKERS ?= 2
DEMO_WORKDIR ?= runs/quickstart
BENCH_OUT ?= runs/bench_train.json

.PHONY: help demo test lint format venv install install-dev bench-train clean-demo

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

$(VENV)/bin/python:
	@interpreter="$$(bash scripts/find_python.sh)" || exit 1; \
	echo "creating $(VENV) with $$interpreter"; \
	"$$interpreter" -m venv $(VENV)

$(VENV)/.installed: $(VENV)/bin/python requirements.txt pyproject.toml
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -e .
	@touch $@

$(VENV)/.installed-dev: $(VENV)/.installed requirements-dev.txt
	$(PY) -m pip install --quiet -r requirements-dev.txt
	@touch $@

venv: $(VENV)/bin/python  ## create the virtual environment

install: $(VENV)/.installed  ## install the package and its runtime dependencies

install-dev: $(VENV)/.installed-dev  ## install runtime + test dependencies

demo: $(VENV)/.installed  ## train the quickstart (static teacher, then dynamic model) on the embedded dataset
	$(PY) -m laud_jax.train --exp configs/quickstart.py --workdir $(DEMO_WORKDIR)

test: $(VENV)/.installed-dev  ## run the test suite
	$(PY) -m pytest -n $(PYTEST_WORKERS) --dist loadfile -q tests

lint: $(VENV)/.installed-dev  ## check formatting and lint (ruff; configured in pyproject.toml)
	$(PY) -m ruff format --check .
	$(PY) -m ruff check .

format: $(VENV)/.installed-dev  ## reformat the tree and apply safe lint fixes (ruff)
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

bench-train: $(VENV)/.installed  ## training throughput: dynamic vs static ResNet-50 step (batch 8, CPU)
	$(PY) -m laud_jax.training.throughput --out $(BENCH_OUT)

clean-demo:  ## remove the demo's work directory (a new make demo starts from scratch)
	rm -rf $(DEMO_WORKDIR)
