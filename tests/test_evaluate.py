from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest

from pipeline import evaluate
from pipeline.evaluate import (
    attach_test_metrics,
    classification_metrics,
    comparison_table,
    confident_mistakes,
    report_paths,
    write_predictions,
    write_reports,
)
from pipeline.images import LabeledImage


def test_metrics_of_a_known_prediction() -> None:
    labels = np.array([0, 0, 1, 1])
    probs = np.array([0.1, 0.6, 0.8, 0.4])
    scores = classification_metrics(labels, probs, threshold=0.5)
    assert scores["accuracy"] == 0.5
    assert scores["precision"] == 0.5 and scores["recall"] == 0.5 and scores["f1"] == 0.5
    assert scores["roc_auc"] == 0.75
    expected = -np.mean(np.log([0.9, 0.4, 0.8, 0.4]))
    assert scores["log_loss"] == pytest.approx(expected)
    # A higher threshold calls 0.6 a cat now, and 0.8 still a dog: the threshold is used.
    strict = classification_metrics(labels, probs, threshold=0.7)
    assert strict["accuracy"] == 0.75 and strict["precision"] == 1.0 and strict["recall"] == 0.5
    assert strict["roc_auc"] == scores["roc_auc"] and strict["log_loss"] == scores["log_loss"]


def test_confident_mistakes_keep_log_loss_finite() -> None:
    scores = classification_metrics(np.array([0, 1]), np.array([1.0, 0.0]), 0.5)
    assert math.isfinite(scores["log_loss"]) and scores["accuracy"] == 0
    assert scores["log_loss"] == pytest.approx(-math.log(1e-7), rel=1e-3)  # clipped, as Kaggle


def test_comparison_table_has_a_column_per_model() -> None:
    base = dict.fromkeys(evaluate.METRIC_NAMES, 0.5)
    table = comparison_table({"cnn": base, "transfer": {**base, "accuracy": 0.9}})
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in table.splitlines()]
    assert rows[0] == ["metric", "cnn", "transfer"]
    assert ["accuracy", "0.5000", "0.9000"] in rows
    assert [row[0] for row in rows[2:]] == list(evaluate.METRIC_NAMES)


def test_predictions_csv_feeds_dvc_confusion_plot(tmp_path: Path) -> None:
    path = tmp_path / "p.csv"
    write_predictions(path, ["a.jpg", "b.jpg"], np.array([0, 1]), np.array([0.2, 0.3]), 0.5)
    rows = list(csv.DictReader(path.open()))
    assert [(r["actual"], r["predicted"]) for r in rows] == [("cats", "cats"), ("dogs", "cats")]


def test_confident_mistakes_come_first_and_right_answers_never() -> None:
    files = ["a", "b", "c", "d", "e"]
    labels = np.array([0, 0, 1, 1, 0])
    probs = np.array([0.99, 0.6, 0.05, 0.9, 0.2])
    mistakes = confident_mistakes(files, labels, probs, threshold=0.5, count=2)
    assert mistakes == [("a", 0, 0.99), ("c", 1, 0.05)]
    assert confident_mistakes(files, labels, probs, 0.5, 10)[-1] == ("b", 0, 0.6)


def two_models_predictions(folder: Path) -> dict[str, tuple[list[str], np.ndarray, np.ndarray]]:
    from devtools.fakes import jpeg_bytes, photo

    files = []
    for i in range(8):
        path = folder / f"img{i}.jpg"
        path.write_bytes(jpeg_bytes(photo(i % 2, i)))
        files.append(str(path))
    labels = np.array([0, 1] * 4)
    probs = np.linspace(0.05, 0.95, 8)
    return {"cnn": (files, labels, probs), "transfer": (files, labels, probs[::-1])}


def test_reports_hold_every_figure_and_table(tmp_path: Path) -> None:
    predictions = two_models_predictions(tmp_path)
    ids = {"mlflow_run_id": "abc"}
    results = write_reports(predictions, 0.5, tmp_path / "reports", ids)
    assert set(results) == {"cnn", "transfer"}
    names = {p.name for p in (tmp_path / "reports").iterdir()}
    assert names == set(report_paths(predictions, tmp_path))  # nothing else, no staging files
    metrics = json.loads((tmp_path / "reports/metrics.json").read_text())
    # Only the models' scores, by the names MLflow's parent run has them: cnn/test/accuracy.
    assert metrics == {
        f"{model}/test/{name}": value
        for model, scores in results.items()
        for name, value in scores.items()
    }
    assert json.loads((tmp_path / "reports/mlflow.json").read_text()) == ids
    for expected in (
        "roc.png",
        "precision_recall.png",
        "calibration.png",
        "comparison.md",
        "confusion_cnn.png",
        "mistakes_transfer.png",
        "predictions_cnn.csv",
        "roc_transfer.csv",
    ):
        assert expected in names


def test_a_failure_part_way_leaves_the_previous_reports_whole(tmp_path: Path, monkeypatch) -> None:
    predictions = two_models_predictions(tmp_path)
    reports = tmp_path / "reports"
    write_reports(predictions, 0.5, reports, {"mlflow_run_id": "first"})
    before = {path.name: path.read_bytes() for path in reports.iterdir()}

    def fail(*_args):
        raise RuntimeError("the disk filled up")

    monkeypatch.setattr(evaluate.plots, "calibration", fail)  # after every per-model file
    flipped = {name: (f, y, 1 - p) for name, (f, y, p) in predictions.items()}
    with pytest.raises(RuntimeError, match="disk filled"):
        write_reports(flipped, 0.5, reports, {"mlflow_run_id": "second"})
    assert {path.name: path.read_bytes() for path in reports.iterdir()} == before


def test_a_model_evaluated_before_but_not_now_leaves_no_reports_behind(tmp_path: Path) -> None:
    predictions = two_models_predictions(tmp_path)
    reports = tmp_path / "reports"
    write_reports(predictions, 0.5, reports)
    write_reports({"cnn": predictions["cnn"]}, 0.5, reports)  # fine-tuning turned off, say
    assert {path.name for path in reports.iterdir()} == set(report_paths(["cnn"], reports))


def test_test_metrics_of_a_model_the_store_does_not_know_are_a_warning(tmp_path, monkeypatch):
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    results = {"cnn": {"accuracy": 0.9}, "transfer": {"accuracy": 0.8}}
    # The ids a training stage recorded in a clone whose MLflow store was another one.
    warnings = attach_test_metrics(results, {"cnn": "m-0123456789abcdef", "transfer": None})
    assert len(warnings) == 1 and "cnn" in warnings[0] and "m-0123456789abcdef" in warnings[0]

    with mlflow.start_run() as training:
        model = mlflow.initialize_logged_model(name="cnn", source_run_id=training.info.run_id)
    assert attach_test_metrics(results, {"cnn": model.model_id}) == []
    logged = mlflow.get_logged_model(model.model_id)
    assert {metric.key: metric.value for metric in logged.metrics} == {"test/accuracy": 0.9}
    assert mlflow.get_run(training.info.run_id).data.metrics == {"test/accuracy": 0.9}


def test_test_metrics_are_linked_to_the_model_and_the_test_split(tmp_path, monkeypatch):
    import mlflow

    from pipeline import tracking

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    test_images = [
        LabeledImage(tmp_path / "cats/1.jpg", 0),
        LabeledImage(tmp_path / "dogs/2.jpg", 1),
    ]
    with mlflow.start_run() as training:
        model = mlflow.initialize_logged_model(name="cnn", source_run_id=training.info.run_id)
    with mlflow.start_run():  # evaluate's run, which logs the test split as its input
        test_set = tracking.log_image_inputs(test_images, "test", "evaluation")
        assert (
            attach_test_metrics({"cnn": {"accuracy": 0.75}}, {"cnn": model.model_id}, test_set)
            == []
        )
    (metric,) = mlflow.get_logged_model(model.model_id).metrics
    assert (metric.key, metric.value) == ("test/accuracy", 0.75)
    assert (metric.dataset_name, metric.dataset_digest) == ("test", test_set.digest)


def test_accuracy_comes_with_its_95_percent_wilson_interval() -> None:
    labels = np.array([1] * 50 + [0] * 50)
    probs = np.where(np.arange(100) < 90, labels, 1 - labels).astype(float)  # 90 right
    scores = classification_metrics(labels, probs, 0.5)
    z, n, p = 1.959964, 100, 0.9  # Wilson (1927): the score interval's centre and half-width
    centre = (p + z**2 / (2 * n)) / (1 + z**2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z**2 / (4 * n**2)) / (1 + z**2 / n)
    assert scores["accuracy"] == pytest.approx(0.9)
    assert scores["accuracy_ci_low"] == pytest.approx(centre - half, abs=1e-6)
    assert scores["accuracy_ci_high"] == pytest.approx(centre + half, abs=1e-6)
    # A perfect score still has an interval below 1 (a normal approximation would give 1 to 1).
    perfect = classification_metrics(labels, labels.astype(float), 0.5)
    assert perfect["accuracy_ci_low"] < 1 and perfect["accuracy_ci_high"] == pytest.approx(1)
