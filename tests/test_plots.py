from __future__ import annotations

import warnings

import numpy as np
import pytest

from pipeline import plots
from pipeline.plots import training_history


def test_history_figure_draws_train_and_validation_per_metric() -> None:
    history = {"train/loss": [0.7, 0.5], "val/loss": [0.6, 0.6], "train/accuracy": [0.5, 0.8]}
    figure = training_history(history, "head")
    loss_axis, accuracy_axis = figure.axes
    assert [line.get_label() for line in loss_axis.lines] == ["train", "validation"]
    assert [line.get_label() for line in accuracy_axis.lines] == ["train"]
    assert list(loss_axis.lines[0].get_xdata()) == [1, 2]


def test_an_empty_history_gives_an_empty_figure_without_warnings() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        figure = training_history({}, "fine-tuning disabled")
    assert all(not axis.lines and axis.get_legend() is None for axis in figure.axes)
    assert figure.texts[0].get_text() == "fine-tuning disabled"


def two_models() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    labels = np.array([0, 1] * 6)
    probs = np.linspace(0.05, 0.95, 12)
    return {"cnn": (labels, probs), "transfer": (labels, probs[::-1])}


def legend(figure) -> list[str]:
    return [text.get_text() for text in figure.axes[0].get_legend().get_texts()]


def test_curves_draw_one_line_per_model_named_with_its_score() -> None:
    scores = two_models()
    roc = legend(plots.roc_curves(scores))
    assert roc[0].startswith("cnn") and "AUC" in roc[0] and roc[-1] == "chance"
    precision_recall = legend(plots.precision_recall_curves(scores))
    assert [label.split()[0] for label in precision_recall] == ["cnn", "transfer"]
    assert all("AP" in label for label in precision_recall)
    assert {"cnn", "transfer"} <= set(legend(plots.calibration(scores, bins=4)))


def test_calibration_bins_the_probabilities_as_asked() -> None:
    labels = np.array([0, 0, 1, 1])
    axis = plots.calibration({"cnn": (labels, np.array([0.1, 0.2, 0.7, 0.9]))}, bins=2).axes[0]
    model_line = next(line for line in axis.lines if line.get_label() == "cnn")
    assert list(model_line.get_xdata()) == pytest.approx([0.15, 0.8])  # mean P(dog) per bin
    assert list(model_line.get_ydata()) == [0, 1]  # fraction of dogs per bin


def test_confusion_matrix_counts_each_cell_under_class_names() -> None:
    labels = np.array([0, 0, 0, 1, 1])
    predicted = np.array([0, 0, 1, 1, 1])
    axis = plots.confusion_matrix(labels, predicted, ("cats", "dogs"), "cnn").axes[0]
    assert [t.get_text() for t in axis.texts] == ["2", "1", "0", "2"]  # row by row: actual
    assert [t.get_text() for t in axis.get_xticklabels()] == ["cats", "dogs"]
    assert axis.get_xlabel() == "predicted" and axis.get_ylabel() == "actual"


def test_a_test_split_of_one_class_still_draws_every_figure() -> None:
    scores = {"cnn": (np.zeros(4, dtype=int), np.array([0.1, 0.4, 0.6, 0.9]))}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scikit-learn warns that ROC is undefined
        for draw in (plots.roc_curves, plots.precision_recall_curves):
            assert draw(scores).axes[0].lines
        assert plots.calibration(scores, 4).axes[0].lines
        assert plots.confusion_matrix(*scores["cnn"][:1], np.ones(4, int), ("c", "d"), "t").axes
