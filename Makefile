# The README's commands. Every target does its own set-up, so a fresh clone needs nothing else.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
BENCH_STAMP := $(VENV)/.bench-installed
PARAMS ?= params/default.yaml

.PHONY: setup browser test test-all reproduce lab bench lint clean

setup: $(STAMP)

# Reinstall only when the lock or the package metadata changes.
$(STAMP): constraints.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev]"
	$(BIN)/python -m ipykernel install --sys-prefix --name vitprune --display-name "vitprune (.venv)" >/dev/null
	touch $(STAMP)

# Debian's Chromium, which the JupyterLab browser test drives (Playwright, pointed at /usr/bin/chromium).
browser:
	@command -v chromium >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
		apt-get install -y -qq chromium >/dev/null; } || echo "note: could not install chromium (needs root and Debian's packages); the browser test will be skipped outside CI"

test: setup browser
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

reproduce: setup
	$(BIN)/vitprune reproduce $(PARAMS)

lab: setup
	$(BIN)/jupyter lab $(if $(filter 0,$(shell id -u)),--allow-root) notebooks/

# Torch-Pruning, the peer `make bench` measures against, is a benchmark-only extra
$(BENCH_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev,bench]"
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(BIN)/python -m vitprune.study.bench --out benchmarks/results.json

lint: setup
	$(BIN)/ruff check .

clean:
	rm -rf runs/ .pytest_cache
