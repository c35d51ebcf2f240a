"""Figures for reports and MLflow. Each function returns a matplotlib Figure; callers save it.

Figures are made as `Figure` objects, outside pyplot's figure manager, so nothing here needs
a display or leaves a figure open. scikit-learn's displays draw the standard ones on them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure
from sklearn.calibration import CalibrationDisplay
from sklearn.metrics import ConfusionMatrixDisplay, PrecisionRecallDisplay, RocCurveDisplay


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


# A model's name -> (true labels, P(dog)) on the test split.
Scores = Mapping[str, tuple[np.ndarray, np.ndarray]]


def confusion_matrix(
    labels: np.ndarray, predicted: np.ndarray, class_names: Sequence[str], title: str
) -> Figure:
    figure = Figure(figsize=(4, 4))
    axis = figure.subplots()
    ConfusionMatrixDisplay.from_predictions(
        labels,
        predicted,
        labels=range(len(class_names)),
        display_labels=class_names,
        cmap="Blues",
        colorbar=False,
        ax=axis,
    )
    axis.set(xlabel="predicted", ylabel="actual", title=title)
    figure.tight_layout()
    return figure


def curves(scores: Scores, draw: Callable[..., object], **labels: str) -> Figure:
    """One scikit-learn display per model on shared axes, labelled in our words."""
    figure = Figure(figsize=(5, 5))
    axis = figure.subplots()
    for name, (y_true, probs) in scores.items():
        draw(y_true, probs, name=name, ax=axis)
    axis.set(**labels)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    return figure


def roc_curves(scores: Scores) -> Figure:
    """True against false positive rate, AUC in the legend, beside chance's diagonal."""
    figure = curves(
        scores,
        RocCurveDisplay.from_predictions,
        xlabel="false positive rate",
        ylabel="true positive rate",
        title="ROC on the test split",
    )
    figure.axes[0].plot([0, 1], [0, 1], ":", color="grey", label="chance")
    figure.axes[0].legend(loc="lower right")
    return figure


def precision_recall_curves(scores: Scores) -> Figure:
    """Dogs as the positive class, average precision in the legend."""
    return curves(
        scores,
        PrecisionRecallDisplay.from_predictions,
        xlabel="recall (dogs found)",
        ylabel="precision (dog predictions right)",
        title="Precision-recall on the test split",
    )


def calibration(scores: Scores, bins: int) -> Figure:
    """Fraction of dogs against the mean P(dog) in each of `bins` equal-width bins."""
    draw = functools.partial(CalibrationDisplay.from_predictions, n_bins=bins)
    return curves(
        scores,
        draw,
        xlabel="predicted probability of a dog",
        ylabel="fraction that are dogs",
        title="Calibration on the test split",
    )


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
