# The commands the README shows. DVC orchestrates the pipeline; this file only sets up
# the environment and names the entry points.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PORT ?= 5000
HOST ?= 127.0.0.1
# The shared tracking server's stores: SQLite and a folder here; PostgreSQL/MySQL and S3 in
# production (see docs/tracking-server.md).
SERVER_STORE ?= sqlite:///$(CURDIR)/mlflow-server/mlflow.db
SERVER_ARTIFACTS ?= $(CURDIR)/mlflow-server/artifacts
# The default MLflow store (see pipeline/tracking.py); MLFLOW_TRACKING_URI overrides it.
MLFLOW_URI ?= $(or $(MLFLOW_TRACKING_URI),sqlite:///$(CURDIR)/mlflow.db)

.PHONY: pipeline test lint lint-ci format mlflow-ui mlflow-db mlflow-server compare promote clean-venv

$(BIN)/.installed: pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c requirements.lock -e '.[dev]'
	touch $@

## Set up and run the whole pipeline (downloads the data on first run).
pipeline: $(BIN)/.installed mlflow-db
	$(BIN)/dvc repro

## Set up and run the test suite.
test: $(BIN)/.installed
	$(BIN)/python -m pytest

lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

## Lint the CI files, offline: the workflows (schema, zizmor) and the Dockerfile (hadolint).
lint-ci: $(BIN)/.installed
	$(BIN)/pip install --quiet -c requirements.lock -r requirements-lint.txt
	$(BIN)/check-jsonschema --builtin-schema vendor.github-workflows .github/workflows/*.yml
	$(BIN)/zizmor --offline .github/workflows
	$(BIN)/hadolint Dockerfile

format: $(BIN)/.installed
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

## Create or migrate the MLflow database once, before stages (or parallel queues) use it.
mlflow-db: $(BIN)/.installed
	@case "$(MLFLOW_URI)" in sqlite:*) $(BIN)/mlflow db upgrade "$(MLFLOW_URI)";; esac

## Browse runs at http://127.0.0.1:$(PORT)
mlflow-ui: $(BIN)/.installed
	$(BIN)/mlflow ui --backend-store-uri $(MLFLOW_URI) --host 127.0.0.1 --port $(PORT)

## A shared tracking server; then `export MLFLOW_TRACKING_URI=http://$(HOST):$(PORT)`.
mlflow-server: $(BIN)/.installed
	mkdir -p $(SERVER_ARTIFACTS)
	@case "$(SERVER_STORE)" in sqlite:*) $(BIN)/mlflow db upgrade "$(SERVER_STORE)";; esac
	$(BIN)/mlflow server --backend-store-uri "$(SERVER_STORE)" \
	    --artifacts-destination "$(SERVER_ARTIFACTS)" --host $(HOST) --port $(PORT)

## One row per pipeline execution in MLflow, the params that differ, test metrics.
compare: $(BIN)/.installed
	$(BIN)/python -m pipeline.compare $(ARGS)

## Register the best evaluated model and alias it @champion.
promote: $(BIN)/.installed
	$(BIN)/python -m pipeline.registry promote $(ARGS)

clean-venv:
	rm -rf $(VENV)
