# Everything goes through a project virtualenv in .venv, created on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of torch; on a GPU machine use e.g. `make install TORCH=torch` for the CUDA build.
TORCH ?= torch==2.13.0
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1

.PHONY: install test test-fast lint format demo bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

install: $(VENV)/.installed

test: install
	$(BIN)/pytest -q

test-fast: install
	$(BIN)/pytest -q -m "not slow"

lint: install
	$(BIN)/ruff check loratool tests scripts
	$(BIN)/ruff format --check loratool tests scripts

format: install
	$(BIN)/ruff check --fix loratool tests scripts
	$(BIN)/ruff format loratool tests scripts

# The demo: build a tiny random Llama (with a real trained tokenizer) and fine-tune it on the embedded
# smoke dataset, on CPU, in well under a minute.
demo: install
	$(BIN)/python scripts/make_tiny_model.py .cache/tiny-llama --arch llama --hidden-size 256 --layers 4
	$(BIN)/loratool train recipes/tiny-smoke.yaml --overwrite

bench: install
	$(BIN)/python scripts/bench_train.py
	$(BIN)/python scripts/bench_merge.py

clean:
	rm -rf $(VENV) .cache out .pytest_cache .ruff_cache *.egg-info
