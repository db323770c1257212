# The README's two commands: `make demo` and `make test`. Everything else is a helper.
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

export PREFECT_HOME ?= $(CURDIR)/.prefect
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 90
export PREFECT_RESULTS_LOCAL_STORAGE_PATH ?= $(CURDIR)/.prefect/results
export MLFLOW_DISABLE_TELEMETRY ?= true

.PHONY: demo test test-fast lint bench ui install clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev,scale]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/ecgproto demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check ecgproto flows tests benchmarks
	$(BIN)/ruff format --check ecgproto flows tests benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/ingest.py
	$(BIN)/python benchmarks/train_throughput.py
	$(BIN)/python benchmarks/associate.py

ui: $(STAMP)
	$(BIN)/ecgproto ui

clean:
	rm -rf data/demo data/store data/train explanations .prefect mlflow/mlflow.db mlflow/artifacts
