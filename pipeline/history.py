"""Per-epoch training history: its summary and the CSV `dvc plots` draws.

Apart from `pipeline.training` so a stage can write an empty history without importing
TensorFlow (a disabled `finetune`).

One vocabulary everywhere (MLflow runs, the parent run, logged models, DVC metrics and plots):
Keras's `loss` and `val_loss` are `train/loss` and `val/loss`, so MLflow groups the charts by
split; epochs count from 1, as Keras prints them: the MLflow step of an epoch's metrics, the
`epoch` column of history.csv and `best_epoch` are the same number.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from pipeline.files import atomic_file

VALIDATION_LOSS = "val/loss"


def metric_name(keras_name: str) -> str:
    """`val_accuracy` -> `val/accuracy`, `loss` -> `train/loss`."""
    split, _, name = keras_name.partition("val_")
    return f"val/{name}" if not split and name else f"train/{keras_name}"


def renamed(keras_logs: dict[str, float]) -> dict[str, float]:
    return {metric_name(name): value for name, value in keras_logs.items()}


def summarize_history(history: dict[str, list[float]]) -> dict[str, float | int]:
    """The best epoch (lowest validation loss, the one early stopping restores), counted from
    1, and that epoch's scores under their own names: the scores of the weights kept.

    Epochs whose loss is NaN (a diverging run) are never the best, as for early stopping.
    """
    val_loss = np.asarray(history[VALIDATION_LOSS], dtype=float)
    if np.isnan(val_loss).all():
        raise ValueError("the validation loss was NaN in every epoch: training diverged")
    best = int(np.nanargmin(val_loss))
    summary: dict[str, float | int] = {"epochs_run": len(val_loss), "best_epoch": best + 1}
    summary.update({name: values[best] for name, values in history.items()})
    return summary


def write_history(path: Path, history: dict[str, list[float]]) -> None:
    """Per-epoch history as CSV, the format `dvc plots` reads."""
    names = sorted(history)
    with atomic_file(path) as staging, staging.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["epoch", *names])
        for epoch, row in enumerate(zip(*(history[n] for n in names), strict=True), start=1):
            writer.writerow([epoch, *(f"{v:.6f}" for v in row)])
