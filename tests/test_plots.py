from __future__ import annotations

import warnings

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
