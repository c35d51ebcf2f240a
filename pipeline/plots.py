"""Figures for reports and MLflow. Each function returns a matplotlib Figure; callers save it.

Figures are made without pyplot, so nothing here needs a display or keeps global state.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure


def image_grid(grid: np.ndarray, column_titles: Sequence[str] = ()) -> Figure:
    """`grid` is `(rows, columns, height, width, 3)` uint8 pixels."""
    rows, columns = grid.shape[:2]
    figure = Figure(figsize=(1.8 * columns, 1.8 * rows))
    axes = figure.subplots(rows, columns, squeeze=False)
    for r in range(rows):
        for c in range(columns):
            axes[r, c].imshow(grid[r, c])
            axes[r, c].axis("off")
            if r == 0 and c < len(column_titles):
                axes[r, c].set_title(column_titles[c], fontsize=8)
    figure.tight_layout()
    return figure


def training_history(history: Mapping[str, Sequence[float]], title: str) -> Figure:
    """Loss and accuracy per epoch, training beside validation."""
    figure = Figure(figsize=(10, 4))
    axes = figure.subplots(1, 2)
    for axis, metric in zip(axes, ("loss", "accuracy"), strict=True):
        for prefix, style, label in (("train/", "-", "train"), ("val/", "--", "validation")):
            values = history.get(prefix + metric)
            if values:
                axis.plot(range(1, len(values) + 1), values, style, marker="o", label=label)
        axis.set_xlabel("epoch")
        axis.set_ylabel(metric)
        axis.grid(alpha=0.3)
        if axis.lines:  # an empty history (a disabled stage) has nothing to label
            axis.legend()
    figure.suptitle(title)
    figure.tight_layout()
    return figure


def confusion_matrix(matrix: np.ndarray, class_names: Sequence[str], title: str) -> Figure:
    figure = Figure(figsize=(4, 4))
    axis = figure.subplots()
    axis.imshow(matrix, cmap="Blues")
    for (row, column), count in np.ndenumerate(matrix):
        color = "white" if count > matrix.max() / 2 else "black"
        axis.text(column, row, str(count), ha="center", va="center", color=color)
    axis.set_xticks(range(len(class_names)), class_names)
    axis.set_yticks(range(len(class_names)), class_names)
    axis.set_xlabel("predicted")
    axis.set_ylabel("actual")
    axis.set_title(title)
    figure.tight_layout()
    return figure


def roc_curves(curves: Mapping[str, tuple[np.ndarray, np.ndarray, float]]) -> Figure:
    """`curves` maps a model name to `(false positive rates, true positive rates, AUC)`."""
    figure = Figure(figsize=(5, 5))
    axis = figure.subplots()
    for name, (fpr, tpr, auc) in curves.items():
        axis.plot(fpr, tpr, label=f"{name} (AUC {auc:.3f})")
    axis.plot([0, 1], [0, 1], ":", color="grey", label="chance")
    axis.set_xlabel("false positive rate")
    axis.set_ylabel("true positive rate")
    axis.set_title("ROC on the test split")
    axis.legend(loc="lower right")
    axis.grid(alpha=0.3)
    figure.tight_layout()
    return figure


def precision_recall_curves(curves: Mapping[str, tuple[np.ndarray, np.ndarray, float]]) -> Figure:
    """`curves` maps a model name to `(recall, precision, average precision)`."""
    figure = Figure(figsize=(5, 5))
    axis = figure.subplots()
    for name, (recall, precision, average) in curves.items():
        axis.plot(recall, precision, label=f"{name} (AP {average:.3f})")
    axis.set_xlabel("recall (dogs found)")
    axis.set_ylabel("precision (dog predictions right)")
    axis.set_title("Precision-recall on the test split")
    axis.legend(loc="lower left")
    axis.grid(alpha=0.3)
    figure.tight_layout()
    return figure


def calibration(curves: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> Figure:
    """`curves` maps a model name to `(mean predicted probability, fraction of dogs)` per bin."""
    figure = Figure(figsize=(5, 5))
    axis = figure.subplots()
    axis.plot([0, 1], [0, 1], ":", color="grey", label="perfectly calibrated")
    for name, (predicted, observed) in curves.items():
        axis.plot(predicted, observed, marker="o", label=name)
    axis.set_xlabel("predicted probability of a dog")
    axis.set_ylabel("fraction that are dogs")
    axis.set_title("Calibration on the test split")
    axis.legend(loc="upper left")
    axis.grid(alpha=0.3)
    figure.tight_layout()
    return figure


def gallery(images: Sequence[np.ndarray], captions: Sequence[str], title: str) -> Figure:
    """Images in a grid, each with a caption; an empty gallery says so."""
    columns = max(1, min(4, len(images)))
    rows = max(1, -(-len(images) // columns))
    figure = Figure(figsize=(2.6 * columns, 2.9 * rows))
    axes = figure.subplots(rows, columns, squeeze=False)
    for index, axis in enumerate(axes.flat):
        axis.axis("off")
        if index < len(images):
            axis.imshow(images[index])
            axis.set_title(captions[index], fontsize=8)
    if not images:
        axes[0, 0].text(0.5, 0.5, "no mistakes", ha="center", va="center")
    figure.suptitle(title)
    figure.tight_layout()
    return figure
