from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest

from pipeline.evaluate import classification_metrics, comparison_table, write_predictions


def test_metrics_of_a_known_prediction() -> None:
    labels = np.array([0, 0, 1, 1])
    probs = np.array([0.1, 0.6, 0.8, 0.4])
    scores = classification_metrics(labels, probs, threshold=0.5)
    assert scores["accuracy"] == 0.5
    assert scores["precision"] == 0.5 and scores["recall"] == 0.5 and scores["f1"] == 0.5
    assert scores["roc_auc"] == 0.75
    expected = -np.mean(np.log([0.9, 0.4, 0.8, 0.4]))
    assert scores["log_loss"] == pytest.approx(expected)


def test_confident_mistakes_keep_log_loss_finite() -> None:
    scores = classification_metrics(np.array([0, 1]), np.array([1.0, 0.0]), 0.5)
    assert math.isfinite(scores["log_loss"]) and scores["accuracy"] == 0


def test_comparison_table_has_a_column_per_model() -> None:
    base = dict.fromkeys(("accuracy", "precision", "recall", "f1", "roc_auc", "log_loss"), 0.5)
    table = comparison_table({"cnn": base, "transfer": {**base, "accuracy": 0.9}})
    assert table.splitlines()[0] == "| metric | cnn | transfer |"
    assert "| accuracy | 0.5000 | 0.9000 |" in table


def test_predictions_csv_feeds_dvc_confusion_plot(tmp_path: Path) -> None:
    path = tmp_path / "p.csv"
    write_predictions(path, ["a.jpg", "b.jpg"], np.array([0, 1]), np.array([0.2, 0.3]), 0.5)
    rows = list(csv.DictReader(path.open()))
    assert [(r["actual"], r["predicted"]) for r in rows] == [("cats", "cats"), ("dogs", "cats")]
