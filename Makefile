# Two commands on a fresh machine:  make run  (the main job)  and  make test  (the tests).
# Both create .venv first; `make setup` is idempotent and instant once done.
SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.setup-complete
# pip on these machines warns about every missing local index folder; drop just that noise.
QUIET_PIP := sed -u '/is ignored: it is neither a file nor a directory/d'

# Offline Omniglot: use the shared copy of the archives when there is one, unless the caller chose.
SHARED_DATA := $(abspath ../shared/data)
ifeq ($(origin FREE_DATA_DIR), undefined)
ifneq ($(wildcard $(SHARED_DATA)/omniglot/*.zip),)
export FREE_DATA_DIR := $(SHARED_DATA)
endif
endif

.PHONY: help setup run repro test test-all lint clean

help:  ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F ':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

setup: $(STAMP)  ## create .venv with the locked versions (constraints.txt)

$(STAMP): pyproject.toml constraints.txt
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found; free-pipeline needs Python 3.11" >&2; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[ops,dev]" 2>&1 | $(QUIET_PIP)
	touch $@

run: setup  ## main job on embedded defaults: the whole pipeline on the tiny preset
	$(BIN)/free pipeline experiment=tiny

repro: setup  ## dvc repro with the project's python first on PATH (stage commands call `python`)
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/dvc repro

test: setup  ## lint + default test suite (slow tests excluded)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

test-all: setup  ## every test, slow ones included
	$(BIN)/python -m pytest -m ""

lint: setup  ## ruff only
	$(BIN)/ruff check .

clean:  ## remove caches and build outputs (keeps .venv and artifacts)
	rm -rf .cache .pytest_cache .ruff_cache build *.egg-info
