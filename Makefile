# Set-up is part of every target: `make demo` and `make test` work on a fresh clone.
# TORCH_SPEC picks the torch version: 2.13.0, whose CPU build this project's machines (and CI)
# find as a local wheel. Elsewhere PyPI's Linux wheel of it brings CUDA packages: add
# TORCH_INDEX=https://download.pytorch.org/whl/cpu for PyTorch's CPU-only build.
# GPU users: `make install TORCH_SPEC=torch` (or any CUDA build) before the other targets.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
BIN := $(VENV)/bin
DEMO_DIR ?= demo-out

.PHONY: install demo test test-gpu bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

demo: install
	$(BIN)/python examples/demo.py --out $(DEMO_DIR)

test: install
	$(BIN)/python -m pytest -q

test-gpu: install
	$(BIN)/python -m pytest -q -m gpu

# Every benchmark at its defaults: long on a CPU (benchmarks/README.md: what each measures, quick flags).
# Without demo-out/ from `make demo`, the first one makes the demo's teacher under /tmp/logitcache-bench.
bench: install
	$(BIN)/python benchmarks/bench_build.py
	$(BIN)/python benchmarks/bench_loader.py
	$(BIN)/python benchmarks/bench_loss.py
	$(BIN)/python benchmarks/bench_baseline.py
	$(BIN)/python benchmarks/bench_storage.py

clean:
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache
