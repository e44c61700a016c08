# Set-up-inclusive targets: a fresh clone needs only `make test` or `make bench`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# Tiny Shakespeare from the workplace's shared folder when it is there (never committed).
SHARED_DATA := $(wildcard ../shared/data/tinyshakespeare.txt)
export NORMATTN_DATA_DIR ?= $(if $(SHARED_DATA),$(abspath ../shared/data),)

.PHONY: install test test-gpu lint bench compare clean

install: $(VENV)/.installed

# torch is pinned so pip takes the local CPU wheel instead of resolving several GB of CUDA packages.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

test: install
	TRITON_INTERPRET=1 OPENBLAS_NUM_THREADS=1 $(BIN)/python -m pytest -n 2 -q --timeout 600

test-gpu: install
	$(BIN)/python -m pytest -q -m gpu

lint: install
	$(BIN)/ruff check normattn tests
	$(BIN)/ruff format --check normattn tests

bench: install
	$(BIN)/normattn bench --device cpu

compare: install
	$(BIN)/normattn compare --preset shakespeare-char-cpu --overwrite

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
