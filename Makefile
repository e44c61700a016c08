# Set-up-inclusive targets: a fresh clone needs only `make test` or `make bench`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# Tiny Shakespeare from the workplace's shared folder when it is there (never committed).
SHARED_DATA := $(wildcard ../shared/data/tinyshakespeare.txt)
export NORMATTN_DATA_DIR ?= $(if $(SHARED_DATA),$(abspath ../shared/data),)

.PHONY: install test test-gpu lint bench compare clean gpu-static gpu-check gpu-experiment gpu-data

install: $(VENV)/.installed

# torch is pinned so pip takes the local CPU wheel instead of resolving several GB of CUDA packages.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

test: install
	TRITON_INTERPRET=1 OPENBLAS_NUM_THREADS=1 $(BIN)/python -m pytest -n 2 -q --timeout 600 --durations=30

test-gpu: install
	$(BIN)/python -m pytest -q -m gpu

lint: install
	$(BIN)/ruff check normattn tests tools
	$(BIN)/ruff format --check normattn tests tools

bench: install
	$(BIN)/normattn bench --device cpu

# The README's main table: five attentions, two seeds each (about an hour on 2 idle cores).
compare: install
	$(BIN)/normattn compare --preset shakespeare-char-cpu --attentions softmax,softmax-sinks,sigmoid,softpick,beta \
		--seeds 2 --overwrite

# GPU work (README, "GPU"). gpu-static needs no GPU: it compiles every kernel specialization of a
# covering set for sm_90 here and fails on spills or too much shared memory. It reuses each row of the
# committed docs/results/gpu-static/static.csv whose key (kernel source hash, specialization with its
# tiles, Triton and ptxas versions) is unchanged and compiles only the rest; FRESH=1 recompiles all.
gpu-static: install
	$(BIN)/python -m tools.gpu_static --out docs/results/gpu-static $(if $(filter 1,$(FRESH)),--fresh)

# On a lent GPU machine (its own python3, torch and Triton; no .venv, no .git): OUT=dir, at most 8 files.
# DRY_RUN=1 runs every stage on the CPU through the Triton interpreter (CI). COMMIT names the commit
# under test, since the device's copy of the tree has no .git.
DRY := $(filter 1,$(DRY_RUN))
GPU_PYTHON = $(if $(DRY),$(BIN)/python,python3)
COMMIT ?= $(shell git describe --always --dirty 2>/dev/null)

gpu-check: OUT ?= out/gpu-check
gpu-check: $(if $(DRY),install)
	PYTHONUNBUFFERED=1 $(GPU_PYTHON) -m tools.gpu_check --out $(OUT) --commit "$(COMMIT)" $(if $(DRY),--dry-run)

# The 10,000-iteration comparison; a later call on the same (warm) machine resumes it. BUDGET_S: seconds.
gpu-experiment: OUT ?= out/gpu-experiment
gpu-experiment: $(if $(DRY),install)
	PYTHONUNBUFFERED=1 $(GPU_PYTHON) -m tools.gpu_experiment --out $(OUT) $(if $(DRY),--dry-run) \
		$(if $(BUDGET_S),--budget-s $(BUDGET_S))

# Tiny Shakespeare into runs/data (ignored), for a device call to carry: carry=["runs/data"].
gpu-data:
	mkdir -p runs/data && cp $(or $(SHARED_DATA),$(error no ../shared/data/tinyshakespeare.txt)) runs/data/

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
