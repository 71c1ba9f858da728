# Set-up is part of every target: `make demo` and `make test` work on a fresh clone.
# TORCH_SPEC picks the torch build: the default is the CPU build (no CUDA wheels);
# GPU users: `make install TORCH_SPEC=torch` (or any CUDA build) before the other targets.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
DEMO_DIR ?= demo-out

.PHONY: install demo test test-gpu bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

demo: install
	$(BIN)/python examples/demo.py --out $(DEMO_DIR)

test: install
	$(BIN)/python -m pytest -q

test-gpu: install
	$(BIN)/python -m pytest -q -m gpu

bench: install
	$(BIN)/python benchmarks/bench_build.py
	$(BIN)/python benchmarks/bench_loader.py

clean:
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache
