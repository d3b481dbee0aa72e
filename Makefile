# The README's commands. Every target does its own set-up, so a fresh clone needs nothing else.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PARAMS ?= params/default.yaml

.PHONY: setup test test-all reproduce lab bench lint clean

setup: $(STAMP)

# Reinstall only when the lock or the package metadata changes.
$(STAMP): constraints.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev]"
	$(BIN)/python -m ipykernel install --sys-prefix --name vitprune --display-name "vitprune (.venv)" >/dev/null
	touch $(STAMP)

test: setup
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

reproduce: setup
	$(BIN)/vitprune reproduce $(PARAMS)

lab: setup
	$(BIN)/jupyter lab notebooks/

bench: setup
	$(BIN)/python -m vitprune.bench --out benchmarks/results.json

lint: setup
	$(BIN)/ruff check .

clean:
	rm -rf runs/ .pytest_cache
