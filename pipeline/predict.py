"""Classify photos with a trained model (a CLI, not a DVC stage).

    python -m pipeline.predict --model models/transfer.keras photos/ cat.jpg --out predictions.csv

Writes `file,prob_dog,label` for every JPEG/PNG given or found in the folders given. Either
`models/cnn.keras` or `models/transfer.keras` works: both take raw images.
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections.abc import Sequence
from pathlib import Path

import keras
import mlflow
import mlflow.keras
import numpy as np
import tensorflow as tf

from pipeline import tracking
from pipeline.datasets import load_image
from pipeline.files import atomic_file
from pipeline.images import CLASS_NAMES, find_images, inspect_image, is_image_name

DEFAULT_BATCH = 32


def collect_inputs(inputs: Sequence[Path]) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Image files to classify, and `(path, reason)` for inputs that cannot be."""
    files: list[Path] = []
    rejected: list[tuple[Path, str]] = []
    for item in inputs:
        if item.is_dir():
            files.extend(find_images(item))
        elif item.is_file() and is_image_name(item):
            files.append(item)
        elif item.exists():
            rejected.append((item, "not a JPEG/PNG/BMP/GIF file"))
        else:
            rejected.append((item, "no such file or folder"))
    readable: list[Path] = []
    for path in files:
        problem, _ = inspect_image(path.read_bytes())
        if problem:
            rejected.append((path, problem))
        else:
            readable.append(path)
    return readable, rejected


def label_of_probability(prob: float, threshold: float) -> str:
    return CLASS_NAMES[int(prob >= threshold)].removesuffix("s")


def predict_files(model, files: list[Path], batch_size: int = DEFAULT_BATCH) -> np.ndarray:
    """The probability of a dog for each file, decoded exactly as in training."""
    image_size = tuple(model.input_shape[1:3])
    dataset = (
        tf.data.Dataset.from_tensor_slices([str(path) for path in files])
        .map(lambda path: load_image(path, image_size), num_parallel_calls=tf.data.AUTOTUNE)
        .batch(batch_size)
    )
    return model.predict(dataset, verbose=0).ravel()


def load_model(reference: str) -> keras.Model:
    """A `.keras` file, or a model from MLflow by URI (`models:/name@alias`, `runs:/...`)."""
    if ":/" in reference:
        mlflow.set_tracking_uri(tracking.tracking_uri())
        try:
            return mlflow.keras.load_model(reference)
        except mlflow.exceptions.MlflowException as error:
            sys.exit(f"predict: cannot load {reference} from MLflow: {error.message}")
    if not Path(reference).is_file():
        sys.exit(f"predict: model {reference} not found; train it with `dvc repro` first")
    return keras.models.load_model(reference)


def write_predictions(out, files: list[Path], probs: np.ndarray, threshold: float) -> None:
    writer = csv.writer(out)
    writer.writerow(["file", "prob_dog", "label"])
    for path, prob in zip(files, probs, strict=True):
        writer.writerow([path.as_posix(), f"{prob:.6f}", label_of_probability(prob, threshold)])


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.predict", description="Classify photos as cat or dog."
    )
    parser.add_argument("inputs", nargs="+", type=Path, help="image files or folders")
    parser.add_argument(
        "--model",
        required=True,
        help="a trained .keras file, or an MLflow model URI such as models:/dogs-vs-cats@champion",
    )
    parser.add_argument("--out", type=Path, help="CSV to write (default: standard output)")
    parser.add_argument("--threshold", type=float, default=0.5, help="P(dog) for 'dog'")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    model = load_model(args.model)
    files, rejected = collect_inputs(args.inputs)
    for path, reason in rejected:
        print(f"predict: skipped {path}: {reason}", file=sys.stderr)
    if not files:
        sys.exit("predict: no readable images given")
    probs = predict_files(model, files, args.batch_size)
    if args.out:
        with atomic_file(args.out) as staging, staging.open("w", newline="") as handle:
            write_predictions(handle, files, probs, args.threshold)
        dogs = int((probs >= args.threshold).sum())
        print(f"predict: {len(files)} images, {dogs} dogs, {len(files) - dogs} cats -> {args.out}")
    else:
        write_predictions(sys.stdout, files, probs, args.threshold)


if __name__ == "__main__":
    main()
