# The commands the README shows. DVC orchestrates the pipeline; this file only sets up
# the environment and names the entry points.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# DVC runs each stage's `python -m pipeline.<stage>` with the first `python` on PATH. Every
# target below puts this venv first, so nothing needs activating; $(PYTHON) creates the venv
# with the caller's PATH, before the venv exists.
CALLER_PATH := $(PATH)
export VIRTUAL_ENV := $(abspath $(VENV))
export PATH := $(VIRTUAL_ENV)/bin:$(CALLER_PATH)
# make pipeline DATA=~/Downloads/train.zip: your copy of the images (a Kaggle or PetImages
# .zip, .tar(.gz) or folder) instead of the download. WEIGHTS=none (random, for smoke runs)
# or a VGG16 .h5 file instead of downloading the ImageNet weights. Either one makes the run
# a `dvc exp run -S ...`, which also writes the values into params.yaml for later runs.
# PRESET=tutorial: the `-S` overrides listed in presets/tutorial.txt (one per line).
DATA ?=
WEIGHTS ?=
PRESET ?=
PIPELINE_SETS := $(if $(DATA),-S download.source=local -S download.local_path=$(abspath $(DATA))) \
    $(if $(WEIGHTS),-S features.weights=$(WEIGHTS)) \
    $(if $(PRESET),$(addprefix -S ,$(shell grep -v '^#' presets/$(PRESET).txt)))
PORT ?= 5000
HOST ?= 127.0.0.1
# The shared tracking server's stores: SQLite and a folder here; PostgreSQL/MySQL and S3 in
# production (see docs/tracking-server.md).
SERVER_STORE ?= sqlite:///$(CURDIR)/mlflow-server/mlflow.db
SERVER_ARTIFACTS ?= $(CURDIR)/mlflow-server/artifacts
# The default MLflow store (see pipeline/tracking.py); MLFLOW_TRACKING_URI overrides it.
MLFLOW_URI ?= $(or $(MLFLOW_TRACKING_URI),sqlite:///$(CURDIR)/mlflow.db)
# What `make serve` serves: a registered model by alias, or any MLflow model URI.
MODEL ?= models:/dogs-vs-cats@champion

.PHONY: help pipeline test lint lint-ci format mlflow-ui mlflow-db mlflow-server team-stack \
    compare promote serve clean-venv
.DEFAULT_GOAL := help

## List the targets (this text).
help:
	@awk '/^## /{doc = substr($$0, 4); next} /^[a-z][a-z-]*:/{if (doc) printf "  %-14s %s\n", \
	    substr($$1, 1, length($$1) - 1), doc} {doc = ""}' $(MAKEFILE_LIST)

$(BIN)/.installed: pyproject.toml requirements.lock
	PATH='$(CALLER_PATH)' $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c requirements.lock -e '.[dev]'
	touch $@

## Set up and run the pipeline; offline: DATA=zip-or-folder WEIGHTS=none
pipeline: $(BIN)/.installed mlflow-db
ifneq ($(strip $(PIPELINE_SETS)),)
	@# A DVC experiment is a git commit: without a name and email it fails after the training.
	@git config user.name >/dev/null && git config user.email >/dev/null || { \
	    echo 'make pipeline: set your git name and email first (DVC experiments are commits):'; \
	    echo '  git config --global user.name "Your Name"'; \
	    echo '  git config --global user.email you@example.com'; exit 1; }
	$(BIN)/dvc exp run $(strip $(PIPELINE_SETS))
else
	$(BIN)/dvc repro
endif

## Set up and run the test suite.
test: $(BIN)/.installed
	$(BIN)/python -m pytest

## Lint: ruff check and ruff format --check.
lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Installs the linters first.
## Lint workflows (schema, zizmor) and the Dockerfile (hadolint), offline.
lint-ci: $(BIN)/.installed
	$(BIN)/pip install --quiet -c requirements.lock -r requirements-lint.txt
	$(BIN)/check-jsonschema --builtin-schema vendor.github-workflows .github/workflows/*.yml
	$(BIN)/zizmor --offline .github/workflows
	$(BIN)/hadolint Dockerfile

## Fix what ruff can and format the code.
format: $(BIN)/.installed
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

## Create or migrate the MLflow database (the first stage does it too).
mlflow-db: $(BIN)/.installed
	@case "$(MLFLOW_URI)" in sqlite:*) $(BIN)/mlflow db upgrade "$(MLFLOW_URI)";; esac

## Browse runs in MLflow's UI at http://127.0.0.1:5000 (PORT=...).
mlflow-ui: $(BIN)/.installed
	$(BIN)/mlflow ui --backend-store-uri $(MLFLOW_URI) --host 127.0.0.1 --port $(PORT)

# Then `export MLFLOW_TRACKING_URI=http://$(HOST):$(PORT)` where the pipeline runs.
## A shared tracking server, HOST= PORT= (docs/tracking-server.md).
mlflow-server: $(BIN)/.installed
	mkdir -p $(SERVER_ARTIFACTS)
	@case "$(SERVER_STORE)" in sqlite:*) $(BIN)/mlflow db upgrade "$(SERVER_STORE)";; esac
	$(BIN)/mlflow server --backend-store-uri "$(SERVER_STORE)" \
	    --artifacts-destination "$(SERVER_ARTIFACTS)" --host $(HOST) --port $(PORT)

## PostgreSQL + S3 (rclone) + MLflow with auth, for a team (ARGS=--help).
team-stack: $(BIN)/.installed
	$(BIN)/python -m pipeline.team_stack $(ARGS)

## One row per execution: params that differ, test metrics (ARGS=--help).
compare: $(BIN)/.installed
	$(BIN)/python -m pipeline.compare $(ARGS)

## Register the best model as dogs-vs-cats@champion (ARGS=--help).
promote: $(BIN)/.installed
	$(BIN)/python -m pipeline.registry promote $(ARGS)

## Serve MODEL (the champion) for photos at http://127.0.0.1:5000 (PORT=...).
serve: $(BIN)/.installed
	MLFLOW_TRACKING_URI='$(MLFLOW_URI)' $(BIN)/mlflow models serve -m '$(MODEL)' \
	    --env-manager local --host 127.0.0.1 --port $(PORT)

## Remove the virtual environment.
clean-venv:
	rm -rf $(VENV)
