# Quick start: `make demo` trains the embedded digits job; `make test` runs the whole suite.
# Both create .venv and install tlray (with its test tools) on first use.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Nothing leaves the machine: Ray otherwise reports usage statistics to a public server.
export RAY_USAGE_STATS_ENABLED := 0
# A single-machine Ray keeps every socket on 127.0.0.1 (Ray otherwise binds the machine's
# outward address even for a local cluster). Multi-node clusters never run from this Makefile.
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0

.PHONY: install demo lint test bench reference manifests clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

# Transfer learning on the digits (tlray/flows/demo.py): sources, few-shot targets in every mode, a search; about
# 4 minutes on 2 cores. DEMO_FLAGS passes flags on, e.g. make demo DEMO_FLAGS="--k 5 --seed 1 --s3".
demo: install
	$(BIN)/tlray demo $(DEMO_FLAGS)

# Lint and format check (ruff, configured in pyproject.toml); `make test` runs it first.
lint: install
	$(BIN)/ruff check tlray tests bench
	$(BIN)/ruff format --check tlray tests bench
	$(BIN)/lint-imports  # the layers contract in pyproject.toml

test: install lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Benchmarks, never part of the suite (at most 15 minutes on 2 cores): every script in bench/, then one
# table, written to bench/RESULTS.md and bench/results.json. `bench/gpu_check.sh` is the GPU variant.
bench: install
	$(BIN)/python bench/run.py

# Regenerate the spec reference that README.md embeds (a test keeps them in sync).
reference: install
	$(BIN)/tlray reference

# Regenerate k8s/base and k8s/components from tlray/k8s.py and jobs/pets-s3.yaml (a test keeps them in sync).
manifests: install
	$(BIN)/python -m tlray.k8s jobs/pets-s3.yaml k8s

clean:
	rm -rf $(VENV) data outputs .pytest_cache
