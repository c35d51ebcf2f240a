"""Per-epoch training history: its summary and the CSV `dvc plots` draws.

Apart from `pipeline.training` so a stage can write an empty history without importing
TensorFlow (a disabled `finetune`).
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from pipeline.files import atomic_file


def summarize_history(history: dict[str, list[float]]) -> dict[str, float | int]:
    """The best epoch (lowest validation loss, the one early stopping restores) and its scores.

    Epochs whose loss is NaN (a diverging run) are never the best, as for early stopping.
    """
    val_loss = np.asarray(history["val_loss"], dtype=float)
    if np.isnan(val_loss).all():
        raise ValueError("the validation loss was NaN in every epoch: training diverged")
    best = int(np.nanargmin(val_loss))
    summary: dict[str, float | int] = {
        "epochs_run": len(history["val_loss"]),
        "best_epoch": best + 1,
    }
    summary.update({f"best_{name}": values[best] for name, values in history.items()})
    return summary


def write_history(path: Path, history: dict[str, list[float]]) -> None:
    """Per-epoch history as CSV, the format `dvc plots` reads."""
    names = sorted(history)
    with atomic_file(path) as staging, staging.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["epoch", *names])
        for epoch, row in enumerate(zip(*(history[n] for n in names), strict=True), start=1):
            writer.writerow([epoch, *(f"{v:.6f}" for v in row)])
