from __future__ import annotations

import csv
from pathlib import Path

import pytest

from pipeline.history import metric_name, summarize_history, write_history

HISTORY = {
    "train/loss": [0.9, 0.6, 0.5],
    "val/loss": [0.8, 0.4, 0.7],
    "train/accuracy": [0.5, 0.7, 0.8],
    "val/accuracy": [0.55, 0.85, 0.6],
}


def test_keras_names_become_the_pipelines_split_prefixed_ones() -> None:
    assert [metric_name(n) for n in ("loss", "val_loss", "auc", "val_auc")] == [
        "train/loss",
        "val/loss",
        "train/auc",
        "val/auc",
    ]


def test_summary_reports_the_epoch_early_stopping_restores() -> None:
    summary = summarize_history(HISTORY)
    assert summary["best_epoch"] == 2 and summary["epochs_run"] == 3
    # The best epoch's scores under their own names, as the logged model carries them.
    assert summary["val/accuracy"] == 0.85 and summary["train/loss"] == 0.6


def test_history_csv_has_one_row_per_epoch_in_column_order(tmp_path: Path) -> None:
    write_history(tmp_path / "history.csv", HISTORY)
    rows = list(csv.reader((tmp_path / "history.csv").open()))
    assert rows[0] == ["epoch", "train/accuracy", "train/loss", "val/accuracy", "val/loss"]
    assert rows[2] == ["2", "0.700000", "0.600000", "0.850000", "0.400000"]
    assert len(rows) == 4


def test_an_empty_history_is_a_header_only_csv(tmp_path: Path) -> None:
    write_history(tmp_path / "history.csv", {})
    assert (tmp_path / "history.csv").read_text().splitlines() == ["epoch"]


def test_a_nan_epoch_is_never_the_best_and_all_nan_is_an_error() -> None:
    nan = float("nan")
    diverged_later = {"train/loss": [0.9, 0.5, nan], "val/loss": [0.8, 0.6, nan]}
    assert summarize_history(diverged_later)["best_epoch"] == 2
    assert summarize_history({"val/loss": [nan, 0.7, 0.9]})["best_epoch"] == 2
    with pytest.raises(ValueError, match="diverged"):
        summarize_history({"val/loss": [nan, nan]})
