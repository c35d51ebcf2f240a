"""Stage 7: both models on the held-out test split, side by side.

The scratch CNN reads the test images; the transfer model is scored through its head on the
stored test features, which is the same computation as `transfer.keras` on the images
without running VGG16 a second time. Writes DVC metrics and plots under `reports/evaluate`
and logs the same numbers to MLflow, on this stage's run and on the execution's parent.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import keras
import mlflow
import numpy as np
from sklearn import metrics as skm

from pipeline import plots, tracking
from pipeline.config import ConfigError, load_config
from pipeline.datasets import image_dataset
from pipeline.extract_features import load_features
from pipeline.files import atomic_file, write_json, write_text
from pipeline.images import CLASS_NAMES, list_split

METRIC_NAMES = ("accuracy", "precision", "recall", "f1", "roc_auc", "log_loss")
EPSILON = 1e-7  # keeps log loss finite for a confident wrong answer, as Kaggle clips


def classification_metrics(
    labels: np.ndarray, probs: np.ndarray, threshold: float
) -> dict[str, float]:
    """Test metrics of one model; `log_loss` is the Kaggle competition's metric."""
    predicted = (probs >= threshold).astype(int)
    both_classes = len(np.unique(labels)) > 1
    return {
        "accuracy": float(skm.accuracy_score(labels, predicted)),
        "precision": float(skm.precision_score(labels, predicted, zero_division=0)),
        "recall": float(skm.recall_score(labels, predicted, zero_division=0)),
        "f1": float(skm.f1_score(labels, predicted, zero_division=0)),
        "roc_auc": float(skm.roc_auc_score(labels, probs)) if both_classes else float("nan"),
        "log_loss": float(
            skm.log_loss(labels, np.clip(probs, EPSILON, 1 - EPSILON), labels=[0, 1])
        ),
    }


def comparison_table(results: dict[str, dict[str, float]]) -> str:
    """A Markdown table with one row per metric and one column per model."""
    models = list(results)
    lines = ["| metric | " + " | ".join(models) + " |", "|---" * (len(models) + 1) + "|"]
    for name in METRIC_NAMES:
        lines.append(f"| {name} | " + " | ".join(f"{results[m][name]:.4f}" for m in models) + " |")
    return "\n".join(lines) + "\n"


def write_predictions(
    path: Path, files: list[str], labels: np.ndarray, probs: np.ndarray, threshold: float
) -> None:
    """One row per test image: the file DVC's confusion plot and the error gallery read."""
    with atomic_file(path) as staging, staging.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file", "actual", "predicted", "prob_dog"])
        for file, label, prob in zip(files, labels, probs, strict=True):
            writer.writerow(
                [file, CLASS_NAMES[label], CLASS_NAMES[int(prob >= threshold)], f"{prob:.6f}"]
            )


def write_roc(path: Path, labels: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    fpr, tpr, _ = skm.roc_curve(labels, probs)
    with atomic_file(path) as staging, staging.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["fpr", "tpr"])
        writer.writerows(zip(np.round(fpr, 6), np.round(tpr, 6), strict=True))
    return fpr, tpr


def predict_cnn(
    model_path: Path, split_root: Path, batch_size: int
) -> tuple[list[str], np.ndarray, np.ndarray]:
    test = list_split(split_root / "test")
    model = keras.models.load_model(model_path)
    image_size = model.input_shape[1:3]
    dataset = image_dataset(test, image_size, batch_size).map(lambda x, _y: x)
    probs = model.predict(dataset, verbose=0).ravel()
    return [image.path.as_posix() for image in test], np.array([i.label for i in test]), probs


def predict_head(model_path: Path, features_path: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    features, labels, files = load_features(features_path)
    probs = keras.models.load_model(model_path).predict(features, verbose=0).ravel()
    return [str(f) for f in files], labels.astype(int), probs


def main() -> None:
    try:
        cfg = load_config()
    except ConfigError as error:
        sys.exit(str(error))
    paths, threshold = cfg.paths, cfg.evaluate.threshold
    reports = paths.reports.evaluate
    try:
        predictions = {
            "cnn": predict_cnn(paths.models.cnn, paths.split, cfg.evaluate.batch_size),
            "transfer": predict_head(paths.models.head, paths.features / "test.npz"),
        }
    except (FileNotFoundError, ValueError) as error:
        sys.exit(f"evaluate: {error}; run the training stages first")
    with tracking.stage_run("evaluate", cfg, "evaluate") as run:
        results: dict[str, dict[str, float]] = {}
        curves = {}
        for name, (files, labels, probs) in predictions.items():
            results[name] = classification_metrics(labels, probs, threshold)
            write_predictions(reports / f"predictions_{name}.csv", files, labels, probs, threshold)
            fpr, tpr = write_roc(reports / f"roc_{name}.csv", labels, probs)
            curves[name] = (fpr, tpr, results[name]["roc_auc"])
            matrix = skm.confusion_matrix(labels, (probs >= threshold).astype(int), labels=[0, 1])
            with atomic_file(reports / f"confusion_{name}.png") as staging:
                plots.confusion_matrix(matrix, CLASS_NAMES, f"{name} on the test split").savefig(
                    staging
                )
        with atomic_file(reports / "roc.png") as staging:
            plots.roc_curves(curves).savefig(staging)
        write_json(reports / "metrics.json", results)
        table = comparison_table(results)
        write_text(reports / "comparison.md", table)
        flat = {
            f"{model}_test_{name}": value
            for model, scores in results.items()
            for name, value in scores.items()
        }
        mlflow.log_metrics(flat)
        tracking.log_to_parent(run, flat)
        mlflow.log_artifacts(str(reports), artifact_path="reports")
    print("evaluate: test split results\n" + table)


if __name__ == "__main__":
    main()
