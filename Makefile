# Two commands on a fresh machine: `make demo` and `make test` (each sets up .venv when needed).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
EXTRAS ?= cpu,dev
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: setup demo demo-vision test test-all lint wordnet fashion-mnist clean-state

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[$(EXTRAS)]'
	touch $(STAMP)

setup: $(STAMP)  ## create .venv and install tunery with its pinned dependencies

wordnet:  ## the demo data source: Debian's wordnet-base
	@bash scripts/install-wordnet.sh

fashion-mnist:  ## the image demo data source: Debian's dataset-fashion-mnist
	@bash scripts/install-fashion-mnist.sh

demo: setup wordnet  ## the whole pipeline on the embedded default (offline, CPU)
	$(VENV)/bin/tunery init
	$(VENV)/bin/tunery run

demo-vision: setup fashion-mnist  ## the image pipeline end to end (vision/: Fashion-MNIST, SimCLR, fine-tuning; CPU)
	$(VENV)/bin/dvc repro vision/dvc.yaml
	@cat vision/reports/evaluate/stage_value.md vision/metrics/register.json

test: setup  ## the default test suite (fast; no network, no GPU)
	$(PY) -m pytest

test-all: setup  ## including slow tests
	$(PY) -m pytest -m "not gpu"

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

clean-state:  ## forget runs and outputs (MLflow store, DVC outputs, metrics); keeps the venv
	rm -rf mlflow.db mlartifacts .prefect data/raw data/prepared metrics plots dvc.lock
