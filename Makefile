# One command to set up and run the main job, one to set up and run the tests.
#   make demo   -> virtualenv + soljax + embedded assets, then `soljax demo`
#   make test   -> the same plus test extras (torch for cross-checks, lm-eval, datasets), then pytest
# Both install the exact versions in constraints.txt (pyproject.toml declares compatible ranges).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# the suite's pytest-xdist workers (each takes whole test modules; see tests/conftest.py)
TEST_WORKERS ?= 2
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1

.PHONY: install install-dev setup demo test clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml constraints.txt | $(BIN)/python
	$(BIN)/pip install -q -c constraints.txt -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml constraints.txt | $(BIN)/python
	$(BIN)/pip install -q -c constraints.txt -e '.[dev,torch,eval,data]'
	touch $(VENV)/.installed $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

setup: install
	$(BIN)/soljax setup

demo: install
	$(BIN)/soljax demo

test: install-dev
	$(BIN)/soljax setup
	$(BIN)/lint-imports
	SOLJAX_REQUIRE_ASSETS=1 $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
