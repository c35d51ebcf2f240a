"""What both training stages share: fitting with early stopping, and saving what came of it."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from importlib.metadata import version
from pathlib import Path

import keras
import mlflow
import mlflow.keras
import numpy as np
from mlflow.models import infer_signature

from pipeline import plots
from pipeline.config import OptimizerMixin
from pipeline.files import atomic_files, write_json
from pipeline.history import summarize_history, write_history


class EpochMetricsCallback(mlflow.keras.MlflowCallback):
    """MLflow's Keras callback, logging each epoch's metrics as it ends, synchronously.

    MLflow's own queues them for a background thread, which then holds the end of the run for
    up to a second (it polls its queue once a second); one write per epoch takes ~5 ms
    (`bench.incremental`). Its per-evaluation `validation_*` metrics, all at step 0, are
    left out: each epoch's `val_*` metrics carry the same numbers. What it logs as training
    begins (the optimizer's config as params, the model summary) is MLflow's, unchanged.
    """

    def __init__(self) -> None:
        super().__init__()  # per epoch: MLflow's per-step and model_id options are not used here

    def on_epoch_end(self, epoch, logs=None):
        if logs:
            mlflow.log_metrics(logs, step=epoch)

    def on_test_end(self, logs=None):
        pass


def fit(
    model: keras.Model, train, validation, cfg: OptimizerMixin, log_to_mlflow: bool = True
) -> dict[str, list[float]]:
    """Trains with early stopping on validation loss, keeping the best epoch's weights."""
    callbacks: list[keras.callbacks.Callback] = [
        keras.callbacks.EarlyStopping(
            monitor="val_loss", patience=cfg.patience, restore_best_weights=True
        )
    ]
    if log_to_mlflow:
        callbacks.append(EpochMetricsCallback())
    history = model.fit(
        train,
        validation_data=validation,
        epochs=cfg.epochs,
        callbacks=callbacks,
        shuffle=False,  # the datasets shuffle themselves; Keras warns it cannot shuffle them
        verbose=2,
    )
    result = {name: [float(v) for v in values] for name, values in history.history.items()}
    if np.isnan(result["val_loss"]).all():
        sys.exit(
            f"{model.name}: the validation loss was NaN in every epoch, so training diverged "
            "and there is no model to keep; lower the learning rate in params.yaml"
        )
    return result


def save_training_outputs(
    models: Mapping[Path, keras.Model],
    history: dict[str, list[float]],
    reports: Path,
    title: str,
) -> dict[str, float | int]:
    """The models (by path), history CSV and figure, and summary metrics, replacing the
    previous ones together once all are written (`atomic_files`)."""
    summary = summarize_history(history)
    reports_written = [reports / name for name in ("history.csv", "history.png", "metrics.json")]
    with atomic_files(*models, *reports_written) as staged:
        *model_files, history_csv, history_png, metrics = staged
        for model, staging in zip(models.values(), model_files, strict=True):
            model.save(staging)
        write_history(history_csv, history)
        plots.training_history(history, title).savefig(history_png)
        write_json(metrics, summary)
    return summary


def log_and_record_model(
    model: keras.Model,
    name: str,
    example: np.ndarray,
    reports: Path,
    summary: dict[str, float | int],
) -> mlflow.models.model.ModelInfo:
    """Logs the model to MLflow and records its ids beside the stage's metrics.

    `evaluate` reads `mlflow_model_id` to attach test metrics to the logged model, and
    `dvc exp show` shows both ids as columns, the way from a DVC experiment to its runs.
    """
    info = log_keras_model(model, name, example)
    ids = {"mlflow_run_id": mlflow.active_run().info.run_id, "mlflow_model_id": info.model_id}
    write_json(reports / "metrics.json", {**summary, **ids})
    return info


def log_keras_model(
    model: keras.Model, name: str, example: np.ndarray
) -> mlflow.models.model.ModelInfo:
    """Logs a Keras model with the signature inferred from a small input example.

    The requirements are given rather than inferred: inferring them reloads the model in a
    subprocess to watch its imports, 11.5 s per model against 0.1 s (`bench.incremental`).
    """
    # Called, not `predict`ed: under MirroredStrategy, predict splits the one-image example
    # over the replicas and one of them gets none, which aborts.
    prediction = keras.ops.convert_to_numpy(model(example, training=False))
    signature = infer_signature(example, prediction)
    return mlflow.keras.log_model(
        model, name=name, signature=signature, pip_requirements=model_requirements()
    )


def model_requirements() -> list[str]:
    """What loading a logged model needs: Keras and the backend it was saved with."""
    return [f"keras=={version('keras')}", f"tensorflow=={version('tensorflow')}"]
