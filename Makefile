# Everything a fresh machine with Python 3.11 needs: `make demo` or `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.mmpeft-installed
# CPU=1: PyTorch's CPU wheels (without the 3.2 GB of CUDA libraries of the default 5.7 GB install)
TORCH_INDEX ?= $(if $(CPU),https://download.pytorch.org/whl/cpu,)

.PHONY: install lint test test-slow test-all demo bench-params

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "installing mmpeft with its isprs and test extras into $(VENV): PyTorch, timm, peft, transformers and"
	@echo "their dependencies, about 5.7 GB with PyTorch's CUDA libraries (minutes; pip shows its progress)."
	@echo "CPU only (the demo, the tests): make install CPU=1 uses PyTorch's CPU wheels, without the 3.2 GB of CUDA libraries."
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX)) -e '.[isprs,test]'
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
