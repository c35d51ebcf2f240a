"""Stage 8: every model on the held-out test split, side by side (the fine-tuned one too, when on).

The scratch CNN reads the test images; the transfer model is scored through its head on the
stored test features, which is the same computation as `transfer.keras` on the images
without running VGG16 a second time. Writes DVC metrics and plots under `reports/evaluate`
and logs the same numbers to MLflow: on this stage's run, on the execution's parent, and on
each logged model, so the registry can pick the best one.
"""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Iterable
from pathlib import Path

import keras
import mlflow
import numpy as np
import pandas as pd
from PIL import Image
from scipy.stats import binomtest
from sklearn import metrics as skm

from pipeline import plots, process, stage, tracking
from pipeline.config import EvaluateConfig, PathsConfig
from pipeline.datasets import image_dataset, predict_dog_probability
from pipeline.errors import MissingInputError
from pipeline.features import features_file, load_features
from pipeline.files import MLFLOW_IDS_FILE, atomic_dir, write_json
from pipeline.images import CLASS_NAMES, LabeledImage, list_split

METRIC_NAMES = (
    "accuracy",
    "accuracy_ci_low",
    "accuracy_ci_high",
    "precision",
    "recall",
    "f1",
    "roc_auc",
    "log_loss",
)
EPSILON = 1e-7  # keeps log loss finite for a confident wrong answer, as Kaggle clips
GALLERY_SIZE = 12
CALIBRATION_BINS = 10


def classification_metrics(
    labels: np.ndarray, probs: np.ndarray, threshold: float
) -> dict[str, float]:
    """Test metrics of one model; `log_loss` is the Kaggle competition's metric.

    `accuracy_ci_low` and `_high` bound the 95% Wilson score interval of the accuracy: how far
    the same model's accuracy could be on another test split of this size.
    """
    predicted = (probs >= threshold).astype(int)
    both_classes = len(np.unique(labels)) > 1
    correct = int((predicted == labels).sum())
    interval = binomtest(correct, len(labels)).proportion_ci(0.95, method="wilson")
    return {
        "accuracy": correct / len(labels),
        "accuracy_ci_low": float(interval.low),
        "accuracy_ci_high": float(interval.high),
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
    table = pd.DataFrame(results).loc[list(METRIC_NAMES)].rename_axis("metric")
    return table.to_markdown(floatfmt=".4f") + "\n"


def write_predictions(
    path: Path, files: list[str], labels: np.ndarray, probs: np.ndarray, threshold: float
) -> None:
    """One row per test image: the file DVC's confusion plot and the error gallery read."""
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file", "actual", "predicted", "prob_dog"])
        for file, label, prob in zip(files, labels, probs, strict=True):
            writer.writerow(
                [file, CLASS_NAMES[label], CLASS_NAMES[int(prob >= threshold)], f"{prob:.6f}"]
            )


def write_roc(path: Path, labels: np.ndarray, probs: np.ndarray) -> None:
    """The ROC points `dvc plots` draws."""
    fpr, tpr, _ = skm.roc_curve(labels, probs)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["fpr", "tpr"])
        writer.writerows(zip(np.round(fpr, 6), np.round(tpr, 6), strict=True))


def confident_mistakes(
    files: list[str], labels: np.ndarray, probs: np.ndarray, threshold: float, count: int
) -> list[tuple[str, int, float]]:
    """`(file, true label, P(dog))` of the wrong answers given with the most confidence."""
    wrong = np.flatnonzero((probs >= threshold).astype(int) != labels)
    ranked = wrong[np.argsort(-np.abs(probs[wrong] - threshold), kind="stable")]
    return [(files[i], int(labels[i]), float(probs[i])) for i in ranked[:count]]


def thumbnail(path: str, size: int = 160) -> np.ndarray:
    with Image.open(path) as image:
        image = image.convert("RGB")
        image.thumbnail((size, size))
        return np.asarray(image)


def mistakes_figure(name: str, mistakes: list[tuple[str, int, float]]):
    captions = [
        f"{Path(file).name}\n{CLASS_NAMES[label][:-1]}, P(dog)={prob:.2f}"
        for file, label, prob in mistakes
    ]
    title = f"{name}: most confident mistakes on the test split"
    return plots.gallery([thumbnail(file) for file, _, _ in mistakes], captions, title)


def named_by_model(results: dict[str, dict[str, float]]) -> dict[str, float]:
    """`{"cnn": {"accuracy": ...}}` -> `{"cnn/test/accuracy": ...}`: the names on this stage's
    run, the parent run and in metrics.json; each model's own run and logged model have them
    as `test/accuracy`."""
    return {
        f"{model}/test/{name}": value
        for model, scores in results.items()
        for name, value in scores.items()
    }


def logged_model_id(training_metrics: Path) -> str | None:
    """The MLflow logged-model id a training stage recorded beside its metrics, if any."""
    try:
        return json.loads(training_metrics.read_text()).get("mlflow_model_id")
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def attach_test_metrics(
    results: dict[str, dict[str, float]],
    model_ids: dict[str, str | None],
    dataset: mlflow.data.dataset.Dataset | None = None,
) -> list[str]:
    """Logs each model's test metrics on its MLflow logged model and the run that trained it,
    not on this stage's run, where every model's `test/accuracy` would collide; linked to
    `dataset`, the test split, so the model lists them apart from its validation metrics.

    Returns a warning for each model whose id this tracking store does not know: the ids come
    from the training stages' mlflow.json, which DVC restores (from its cache, the run-cache,
    a remote) with the outputs that store's runs made, also where the store is another (a
    new `mlflow.db`, a tracking server); the warning says how to log them there.
    """
    warnings = []
    for model, model_id in model_ids.items():
        if not model_id or model not in results:
            continue
        scores = {f"test/{name}": value for name, value in results[model].items()}
        try:
            source_run = mlflow.get_logged_model(model_id).source_run_id
            mlflow.log_metrics(scores, model_id=model_id, run_id=source_run, dataset=dataset)
        except mlflow.exceptions.MlflowException as error:
            warnings.append(
                f"evaluate: {model}'s test metrics are not on its MLflow model {model_id}, "
                f"which {mlflow.get_tracking_uri()} does not hold ({error.error_code}); "
                "they are on this stage's run and its parent (`dvc exp run -f` trains and "
                "logs every stage in this store)"
            )
    return warnings


def predict_images(
    model_path: Path, split_root: Path, batch_size: int, mirror: bool = False
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """A model that takes raw images (the CNN, the fine-tuned network) on the test images;
    with `mirror`, each image's P(dog) is averaged with its mirror's (`evaluate.tta`)."""
    test = list_split(split_root / "test")
    model = keras.models.load_model(model_path)
    image_size = model.input_shape[1:3]
    dataset = image_dataset(test, image_size, batch_size).map(lambda x, _y: x)
    probs = predict_dog_probability(model, dataset, mirror)
    return [image.path.as_posix() for image in test], np.array([i.label for i in test]), probs


def predict_head(model_path: Path, features_path: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    features, labels, files = load_features(features_path)
    probs = keras.models.load_model(model_path).predict(features, verbose=0).ravel()
    return [str(f) for f in files], labels.astype(int), probs


def main() -> None:
    with stage.context("evaluate") as ctx:
        paths, run = ctx.cfg.paths, ctx.run
        predictions = predict_models(paths, ctx.cfg.evaluate, ctx.cfg.finetune.enabled)
        files, labels, _ = predictions["cnn"]
        test = [LabeledImage(Path(f), int(y)) for f, y in zip(files, labels, strict=True)]
        test_set = tracking.log_image_inputs(test, "test", "evaluation")
        ids = {
            "mlflow_run_id": run.info.run_id,
            "mlflow_parent_run_id": tracking.parent_run_id(run),
        }
        results = write_reports(predictions, ctx.cfg.evaluate.threshold, ctx.reports, ids)
        mlflow.log_metrics(named_by_model(results))
        tracking.log_to_parent(run, named_by_model(results))
        for warning in attach_test_metrics(results, training_model_ids(paths), test_set):
            print(warning, file=sys.stderr)
    print("evaluate: test split results\n" + comparison_table(results))


def predict_models(
    paths: PathsConfig, cfg: EvaluateConfig, finetuned: bool
) -> dict[str, tuple[list[str], np.ndarray, np.ndarray]]:
    """Every model's `(files, labels, P(dog))` on the test split."""
    try:
        predictions = {
            "cnn": predict_images(paths.models.cnn, paths.split, cfg.batch_size, cfg.tta),
            "transfer": predict_head(paths.models.head, features_file(paths.features, "test")),
        }
        if finetuned:
            predictions["finetuned"] = predict_images(
                paths.models.finetuned, paths.split, cfg.batch_size, cfg.tta
            )
    except (FileNotFoundError, ValueError) as error:
        raise MissingInputError(f"{error}; run the training stages first") from None
    return predictions


def training_model_ids(paths: PathsConfig) -> dict[str, str | None]:
    """The MLflow logged-model id each training stage recorded, by model."""
    return {
        "cnn": logged_model_id(paths.reports.train_cnn / MLFLOW_IDS_FILE),
        "transfer": logged_model_id(paths.reports.train_head / MLFLOW_IDS_FILE),
        "finetuned": logged_model_id(paths.reports.finetune / MLFLOW_IDS_FILE),
    }


PER_MODEL_REPORTS = ("predictions_{}.csv", "roc_{}.csv", "confusion_{}.png", "mistakes_{}.png")
SHARED_REPORTS = ("roc.png", "precision_recall.png", "calibration.png", "comparison.md")


def report_paths(models: Iterable[str], reports: Path) -> dict[str, Path]:
    """Every file the stage writes for `models`, by name; metrics.json last."""
    names = [pattern.format(model) for model in models for pattern in PER_MODEL_REPORTS]
    return {
        name: reports / name for name in [*names, *SHARED_REPORTS, MLFLOW_IDS_FILE, "metrics.json"]
    }


def write_reports(
    predictions: dict[str, tuple[list[str], np.ndarray, np.ndarray]],
    threshold: float,
    reports: Path,
    ids: dict[str, str | None] | None = None,
) -> dict[str, dict[str, float]]:
    """Metrics, per-image predictions, curves and figures of every model, metrics.json and
    `ids` in mlflow.json, as the folder `reports`; returns the metrics.

    The folder replaces the previous one once all is written (`atomic_dir`): a failure
    part-way leaves the last run's reports whole, never a mix of two runs, and a run
    without fine-tuning keeps no fine-tuned reports of an earlier one.
    """
    results: dict[str, dict[str, float]] = {}
    scores = {name: (labels, probs) for name, (_, labels, probs) in predictions.items()}
    with atomic_dir(reports) as staging:
        out = report_paths(predictions, staging)
        for name, (files, labels, probs) in predictions.items():
            results[name] = classification_metrics(labels, probs, threshold)
            write_predictions(out[f"predictions_{name}.csv"], files, labels, probs, threshold)
            write_roc(out[f"roc_{name}.csv"], labels, probs)
            predicted = (probs >= threshold).astype(int)
            title = f"{name} on the test split"
            confusion = plots.confusion_matrix(labels, predicted, CLASS_NAMES, title)
            confusion.savefig(out[f"confusion_{name}.png"])
            mistakes = confident_mistakes(files, labels, probs, threshold, GALLERY_SIZE)
            mistakes_figure(name, mistakes).savefig(out[f"mistakes_{name}.png"])
        plots.roc_curves(scores).savefig(out["roc.png"])
        plots.precision_recall_curves(scores).savefig(out["precision_recall.png"])
        plots.calibration(scores, CALIBRATION_BINS).savefig(out["calibration.png"])
        out["comparison.md"].write_text(comparison_table(results))
        write_json(out[MLFLOW_IDS_FILE], ids or {})
        write_json(out["metrics.json"], named_by_model(results))
    return results


if __name__ == "__main__":
    process.run(main)
