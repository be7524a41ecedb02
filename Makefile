# `make demo` and `make test` both bootstrap .venv on a fresh machine.
# torch is pinned to the local CPU wheel first so pip never pulls a multi-GB CUDA build.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
# pytest-xdist workers of `make test` (CI has 2 cores); tests/conftest.py orders the modules.
TEST_WORKERS ?= 2

.PHONY: demo test bench-convert clean

$(BIN)/dropup: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $(BIN)/dropup

demo: $(BIN)/dropup
	HF_HUB_OFFLINE=1 $(BIN)/dropup demo --out runs/demo

test: $(BIN)/dropup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

bench-convert: $(BIN)/dropup
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/convert_bench.py

clean:
	rm -rf runs build src/*.egg-info
