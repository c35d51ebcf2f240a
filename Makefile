# The commands the README shows. DVC orchestrates the pipeline; this file only sets up
# the environment and names the entry points.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PORT ?= 5000
# The default MLflow store (see pipeline/tracking.py); MLFLOW_TRACKING_URI overrides it.
MLFLOW_URI ?= $(or $(MLFLOW_TRACKING_URI),sqlite:///$(CURDIR)/mlflow.db)

.PHONY: pipeline test lint format mlflow-ui mlflow-db clean-venv

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

format: $(BIN)/.installed
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

## Create or migrate the MLflow database once, before stages (or parallel queues) use it.
mlflow-db: $(BIN)/.installed
	@case "$(MLFLOW_URI)" in sqlite:*) $(BIN)/mlflow db upgrade "$(MLFLOW_URI)";; esac

## Browse runs at http://127.0.0.1:$(PORT)
mlflow-ui: $(BIN)/.installed
	$(BIN)/mlflow ui --backend-store-uri $(MLFLOW_URI) --host 127.0.0.1 --port $(PORT)

clean-venv:
	rm -rf $(VENV)
