# Everything a fresh machine with Python 3.11 needs: `make demo` or `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.mmpeft-installed

.PHONY: install lint test test-slow test-all demo bench-params

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[isprs,test]'
	touch $(STAMP)

install: $(STAMP)

# the formatter, the linter and the type checker on the public API (configured in pyproject.toml)
lint: $(STAMP)
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/mypy

# the default test run: fast tests only (a few minutes on 2 cores)
test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

# the slow tests (CI runs them too)
test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow || [ $$? -eq 5 ]  # 5: no slow test collected

test-all: $(STAMP)
	$(BIN)/python -m pytest -q

# the main job end to end on the embedded synthetic default (no downloads)
demo: $(STAMP)
	$(BIN)/mmpeft-isprs demo

bench-params: $(STAMP)
	$(BIN)/python benchmarks/params.py
