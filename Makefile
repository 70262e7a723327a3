# The two commands of the README: `make demo` and `make test`. Both set up .venv themselves.
# TORCH is the torch requirement; the default pin takes the CPU wheel on our machines
# (an unpinned torch pulls a multi-GB CUDA build). Override for a GPU box: make test TORCH=torch
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.memscan-installed
PYTEST_ARGS ?= -m "not slow and not gpu"
DEMO_OUT ?= out/demo-scores.parquet

.PHONY: demo test test-all lint bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	mkdir -p $(dir $(DEMO_OUT))
	$(BIN)/memscan detect data/demo/prompts.csv --model demo --if-exists overwrite -o $(DEMO_OUT) --top 15

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-all: $(STAMP)
	$(BIN)/python -m pytest -m "not gpu"

lint: $(STAMP)
	$(BIN)/ruff check memscan tests benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/throughput.py

clean:
	rm -rf $(VENV) out .pytest_cache
