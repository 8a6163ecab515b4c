# Two commands do all the set-up on a fresh machine:
#   make demo   -> creates .venv, installs, runs the whole pipeline on the bundled demo data
#   make test   -> creates .venv, installs, runs the whole test suite
SHELL := /bin/bash
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
# the torch stack needs ~6 GB on disk
NEED_GB ?= 7
export NO_ALBUMENTATIONS_UPDATE := 1
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: demo test lint install system-deps bench clean

$(VENV)/.installed: pyproject.toml constraints.txt
	@bash .ci/check_disk.sh "$(VENV)" $(NEED_GB)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -c constraints.txt -e '.[dev]'
	@touch $@

install: $(VENV)/.installed

# Debian packages some tests use (WordNet files, nginx); skipped with a reason when not root / no apt.
system-deps:
	@bash .ci/system_deps.sh

demo: install
	$(VENV)/bin/wit-build demo --out runs/demo

# ruff: lint + format check (the config is in pyproject.toml)
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: install system-deps lint
	$(PY) -m pytest

clean:
	rm -rf runs .pytest_cache
