"""What the training stages share: the data they log, fitting with early stopping, and
saving and logging what came of it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import keras
import mlflow
import numpy as np

from pipeline import plots, serving, tracking
from pipeline.config import OptimizerMixin
from pipeline.errors import PipelineError
from pipeline.files import MLFLOW_IDS_FILE, atomic_files, write_json
from pipeline.history import (
    VALIDATION_LOSS,
    metric_name,
    renamed,
    summarize_history,
    write_history,
)
from pipeline.images import LabeledImage


def log_training_data(
    train: Sequence[LabeledImage], validation: Sequence[LabeledImage], prefix: str = ""
) -> None:
    """The images a stage trains and validates on, as MLflow dataset inputs (`prefix` names
    what was computed from them: `features/train`) and as counts, logged before training so
    that a failed run shows them too."""
    tracking.log_image_inputs(train, f"{prefix}train", "training")
    tracking.log_image_inputs(validation, f"{prefix}validation", "validation")
    mlflow.log_metrics({"data/train_images": len(train), "data/validation_images": len(validation)})


class EpochMetricsCallback(keras.callbacks.Callback):
    """Logs each epoch's metrics to MLflow as it ends, synchronously, under the pipeline's
    names (`pipeline.history`), at the epoch's number counted from 1; and the model summary.

    What MLflow's `MlflowCallback` does differently is left out: it queues the metrics for a
    background thread, which then holds the end of the run for up to a second (it polls its
    queue once a second, where one write per epoch takes milliseconds, `bench.incremental`); it logs
    per-evaluation `validation_*` metrics, all at step 0, that repeat each epoch's `val/*`;
    and `optimizer_*` params that repeat the stage's own (`train_cnn.learning_rate`).
    """

    def on_train_begin(self, logs=None):
        lines: list[str] = []
        self.model.summary(print_fn=lambda line, *_args, **_kwargs: lines.append(line))
        mlflow.log_text("\n".join(lines), artifact_file="model_summary.txt")

    def on_epoch_end(self, epoch, logs=None):
        if logs:
            mlflow.log_metrics(renamed(logs), step=epoch + 1)


class TrainingDivergedError(PipelineError):
    """Every epoch's validation loss was NaN: there is no model to keep."""


def fit(
    model: keras.Model,
    train,
    validation,
    cfg: OptimizerMixin,
    log_to_mlflow: bool = True,
    callbacks: Sequence[keras.callbacks.Callback] = (),
) -> dict[str, list[float]]:
    """Trains with early stopping on validation loss, keeping the best epoch's weights; the
    history under the pipeline's metric names (`val/loss`). `callbacks` run before the
    early stopping's, so it judges (and keeps) what they made of each epoch."""
    callbacks = [
        *callbacks,
        keras.callbacks.EarlyStopping(
            monitor="val_loss", patience=cfg.patience, restore_best_weights=True
        ),
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
    result = {
        metric_name(name): [float(v) for v in values] for name, values in history.history.items()
    }
    if np.isnan(result[VALIDATION_LOSS]).all():
        raise TrainingDivergedError(
            f"{model.name}'s validation loss was NaN in every epoch, so training diverged "
            "and there is no model to keep; lower the learning rate in params.yaml"
        )
    return result


# Keras's random image layers: active in training only, so skipped when recomputing statistics.
RANDOM_IMAGE_LAYERS = (
    keras.layers.RandomFlip,
    keras.layers.RandomRotation,
    keras.layers.RandomZoom,
    keras.layers.RandomTranslation,
)


def recompute_batch_norm_statistics(model: keras.Model, batches, images: int) -> int:
    """Sets each batch norm layer's moving mean and variance to their average over the
    first `images` of `batches` (`(images, labels)` batches) under the model's final weights
    ("precise BN"), and returns how many images that was.

    Training leaves moving averages that trail the weights by about 1 / (1 - momentum)
    steps, computed while the weights kept changing: on a small split that is an epoch or
    more, and the model predicts with statistics of weights it no longer has (biased
    towards one class). The model's random augmentation is skipped, so the statistics are
    those of images as they are predicted.
    """
    norms = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    if not norms or images <= 0:
        return 0
    first = next(
        layer
        for layer in model.layers
        if not isinstance(layer, (keras.layers.InputLayer, *RANDOM_IMAGE_LAYERS))
    )
    unaugmented = keras.Model(first.input, model.output)
    momentums = [layer.momentum for layer in norms]
    seen = 0
    for count, (batch, _labels) in enumerate(batches, start=1):
        for layer in norms:  # the running mean of every batch so far
            layer.momentum = (count - 1) / count
        unaugmented(batch, training=True)
        seen += len(batch)
        if seen >= images:
            break
    for layer, momentum in zip(norms, momentums, strict=True):
        layer.momentum = momentum
    return seen


class PreciseBatchNorm(keras.callbacks.Callback):
    """Recomputes batch norm's statistics (`recompute_batch_norm_statistics`) before each
    validation, so every epoch is validated, judged by early stopping and kept with the
    statistics of its own weights, not moving averages trailing them; `images` is the
    number it last used (0 until the first validation)."""

    def __init__(self, batches, images: int):
        super().__init__()
        self.batches, self.wanted, self.images = batches, images, 0

    def on_test_begin(self, logs=None):
        self.images = recompute_batch_norm_statistics(self.model, self.batches, self.wanted)


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


def save_and_log(
    models: Mapping[Path, keras.Model],
    served: Path,
    name: str,
    history: dict[str, list[float]],
    reports: Path,
    title: str,
) -> dict[str, float | int]:
    """`save_training_outputs`, then the model saved as `served` logged to MLflow under
    `name` (`log_and_record_model`); the history's summary."""
    summary = save_training_outputs(models, history, reports, title)
    log_and_record_model(models[served], served, name, reports, summary)
    return summary


def log_and_record_model(
    model: keras.Model,
    saved: Path,
    name: str,
    reports: Path,
    summary: dict[str, float | int],
) -> mlflow.models.model.ModelInfo:
    """Logs the model, saved as `saved`, to MLflow as a model that takes photos
    (`serving.log_photo_model`), and records its ids in `mlflow.json` beside the stage's
    metrics: `evaluate` reads `mlflow_model_id` there to attach test metrics to the logged
    model, and DVC keeps the file with the stage's outputs (cache, experiments, remote), the
    way from them to their runs.

    The stage's run gets the best epoch and the epochs run (its curves carry the scores);
    the execution's parent the scores of the weights kept, under the model's name
    (`cnn/val/accuracy`), beside the test scores `evaluate` puts there (`cnn/test/accuracy`).
    """
    mlflow.log_metrics({key: summary[key] for key in ("best_epoch", "epochs_run")})
    tracking.log_to_parent(mlflow.active_run(), {f"{name}/{k}": v for k, v in summary.items()})
    # At the best epoch's step (its number, as EpochMetricsCallback logs it): MLflow links the
    # run's metrics of that step to the model, so the model carries the scores of the weights
    # early stopping restored (`val/accuracy`, `train/loss`, ...).
    info = serving.log_photo_model(model, saved, name, step=int(summary["best_epoch"]))
    ids = {"mlflow_run_id": mlflow.active_run().info.run_id, "mlflow_model_id": info.model_id}
    write_json(reports / MLFLOW_IDS_FILE, ids)
    return info
