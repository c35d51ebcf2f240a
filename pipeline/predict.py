"""Classify photos with a trained model (a CLI, not a DVC stage).

    python -m pipeline.predict --model models/transfer.keras photos/ cat.jpg --out predictions.csv
    python -m pipeline.predict --model models/transfer.keras test1/ --kaggle-submission --out s.csv

Writes `file,prob_dog,label` for every image (JPEG, PNG, BMP, GIF) given or found in the
folders given. Either `models/cnn.keras` or `models/transfer.keras` works: both take raw
images. With `--kaggle-submission` it writes `id,label` (label = probability of a dog) for
the competition's unlabelled `test1/N.jpg` images, the Dogs vs. Cats Redux format.
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import sys
import tempfile
import zipfile
from collections.abc import Collection, Iterable, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline import process
from pipeline.errors import BadInputError, MissingInputError
from pipeline.files import atomic_file
from pipeline.images import (
    find_images,
    inspect_image,
    is_image_name,
    label_of_probability,
    reencode_as_jpeg,
)

if TYPE_CHECKING:  # TensorFlow, Keras and MLflow are imported where used: `--help` is instant
    import keras
    import numpy as np

DEFAULT_BATCH = 32
PREDICTIONS_HEADER = ("file", "prob_dog", "label")
SUBMISSION_HEADER = ("id", "label")


def collect_inputs(
    inputs: Sequence[Path],
) -> tuple[list[Path], list[tuple[Path, str]], set[Path]]:
    """Image files to classify, `(path, reason)` for inputs that cannot be, and the files to
    re-encode first, as the split stage re-encodes them for training (PNG, GIF, BMP, CMYK,
    alpha flattened onto white)."""
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
    reencode: set[Path] = set()
    for path in files:
        try:
            problem, needs_reencoding = inspect_image(path.read_bytes())
        except OSError as error:
            problem, needs_reencoding = f"cannot read it: {error.strerror or error}", False
        if problem:
            rejected.append((path, problem))
            continue
        readable.append(path)
        if needs_reencoding:
            reencode.add(path)
    return readable, rejected, reencode


def predict_files(
    model,
    files: list[Path],
    batch_size: int = DEFAULT_BATCH,
    reencode: Collection[Path] = (),
    mirror: bool = False,
) -> np.ndarray:
    """The probability of a dog for each file, decoded exactly as in training; with `mirror`,
    averaged with its mirror image's, as `evaluate.tta` scores the test split."""
    import tensorflow as tf

    from pipeline.datasets import load_image, predict_dog_probability

    image_size = tuple(model.input_shape[1:3])
    with tempfile.TemporaryDirectory(prefix="predict-") as converted:
        sources = []
        for index, path in enumerate(files):
            if path in reencode:
                copy = Path(converted) / f"{index}.jpg"
                copy.write_bytes(reencode_as_jpeg(path.read_bytes()))
                path = copy
            sources.append(str(path))
        dataset = (
            tf.data.Dataset.from_tensor_slices(sources)
            .map(lambda path: load_image(path, image_size), num_parallel_calls=tf.data.AUTOTUNE)
            .batch(batch_size)
        )
        return predict_dog_probability(model, dataset, mirror)


def check_classifier(model: keras.Model, reference: str) -> keras.Model:
    """`model` if it takes RGB images of a fixed size and gives one probability each."""
    shape, out = model.input_shape, model.output_shape
    takes_images = (
        isinstance(shape, tuple)
        and len(shape) == 4
        and all(isinstance(side, int) for side in shape[1:3])
        and shape[3] == 3
    )
    if not (takes_images and out == (None, 1)):
        raise BadInputError(
            f"{reference} takes {shape} and gives {out}, not images to P(dog): use "
            "models/cnn.keras, models/transfer.keras or models/finetuned.keras"
        )
    return model


def is_keras_archive(path: Path) -> bool:
    """Whether `path` is a zip with a model's `config.json`, as Keras saves a `.keras` file."""
    try:
        with zipfile.ZipFile(path) as archive:
            return "config.json" in archive.namelist()
    except (zipfile.BadZipFile, OSError):
        return False


def load_model(reference: str) -> keras.Model:
    """A `.keras` file, or a model from MLflow by URI (`models:/name@alias`, `runs:/...`)."""
    import keras
    import mlflow

    from pipeline import serving, tracking

    if ":/" in reference:
        uri = tracking.tracking_uri()
        if missing := tracking.missing_sqlite_store(uri):
            raise MissingInputError(
                f"cannot load {reference}: no MLflow store at {missing}; run predict "
                "in the repository that trained it, or set MLFLOW_TRACKING_URI to its store"
            )
        mlflow.set_tracking_uri(uri)
        try:
            return serving.load_keras_model(reference)
        except mlflow.exceptions.MlflowException as error:
            raise BadInputError(
                f"cannot load {reference} from the MLflow store {uri}: {error.message}"
            ) from None
    if not Path(reference).is_file():
        raise MissingInputError(f"model {reference} not found; train it with `dvc repro` first")
    if Path(reference).suffix == ".keras" and not is_keras_archive(Path(reference)):
        # Keras itself says "File not found" for these.
        raise BadInputError(
            f"{reference} is not a Keras model file (not a .keras zip holding "
            "config.json); use models/cnn.keras, models/transfer.keras or models/finetuned.keras"
        )
    try:
        return keras.models.load_model(reference)
    except (ValueError, OSError, TypeError) as error:
        raise BadInputError(f"cannot load {reference} as a Keras model: {error}") from None


def write_predictions(out, files: list[Path], probs: np.ndarray, threshold: float) -> None:
    writer = csv.writer(out)
    writer.writerow(PREDICTIONS_HEADER)
    for path, prob in zip(files, probs, strict=True):
        writer.writerow([path.as_posix(), f"{prob:.6f}", label_of_probability(prob, threshold)])


# An unreadable test image still needs a row; 0.5 is the answer that costs least log loss.
UNKNOWN_PROBABILITY = 0.5


def submission_rows(
    files: list[Path], probs: np.ndarray, unreadable: list[Path]
) -> list[tuple[int, float]]:
    """`(id, P(dog))` sorted by id, where the id is the number in `test1/N.jpg`; one row per
    id, also for a file given twice (on its own and in its folder): Kaggle refuses repeats."""
    rows = [(path, float(prob)) for path, prob in zip(files, probs, strict=True)]
    rows += [(path, UNKNOWN_PROBABILITY) for path in unreadable]
    by_id: dict[int, tuple[Path, float]] = {}
    for path, prob in rows:
        if not re.fullmatch(r"[1-9][0-9]*", path.stem):
            raise BadInputError(f"{path} is not named like Kaggle's test images (test1/N.jpg)")
        clash, _ = by_id.setdefault(int(path.stem), (path, prob))
        if clash.resolve() != path.resolve():
            raise BadInputError(f"{clash} and {path} both claim id {path.stem}")
    return sorted((image_id, prob) for image_id, (_, prob) in by_id.items())


def write_submission(out, rows: list[tuple[int, float]]) -> None:
    writer = csv.writer(out)
    writer.writerow(SUBMISSION_HEADER)
    writer.writerows((image_id, f"{prob:.6f}") for image_id, prob in rows)


def probability(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{text} is not between 0 and 1")
    return value


def written_by_predict(path: Path) -> bool:
    """Whether `path` starts with the header of a CSV this tool writes."""
    try:
        with path.open("rb") as handle:
            first = handle.readline(256)
    except OSError:
        return False
    fields = tuple(first.rstrip(b"\r\n").decode("ascii", errors="replace").split(","))
    return fields in (PREDICTIONS_HEADER, SUBMISSION_HEADER)


def refuse_unsafe_output(out: Path, reads: Iterable[Path]) -> None:
    """`--out` must be a new file or a CSV this tool wrote, never a folder or one of the files
    it reads: one slip (`--out params.yaml`) must not replace a file.

    Paths are compared resolved: a link `x.jpg` in a folder given may point to `data.csv`."""
    if out.is_dir():
        raise BadInputError(
            f"--out {out} is a folder; give a file name such as {out}/predictions.csv"
        )
    resolved = out.resolve()
    if is_image_name(out) or any(resolved == p.resolve() for p in reads):
        raise BadInputError(f"--out {out} would overwrite a file it reads; give a new .csv file")
    if out.exists() and not written_by_predict(out):
        raise BadInputError(
            f"--out {out} exists and is not a CSV that predict wrote; "
            "give a new file name, or remove it first"
        )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.predict",
        description=__doc__,
        formatter_class=process.HelpFormatter,
    )
    parser.add_argument(
        "inputs", nargs="+", type=Path, help="image files, or folders searched for images"
    )
    parser.add_argument(
        "--model",
        required=True,
        help="a trained .keras file (models/cnn.keras, models/transfer.keras, "
        "models/finetuned.keras), or an MLflow model URI such as models:/dogs-vs-cats@champion",
    )
    parser.add_argument("--out", type=Path, help="the CSV file to write (default: standard output)")
    parser.add_argument(
        "--threshold",
        type=probability,
        default=0.5,
        help="P(dog) from which an image is labelled a dog",
    )
    parser.add_argument(
        "--batch-size",
        type=process.positive_int,
        default=DEFAULT_BATCH,
        help="images per prediction batch (memory, not results)",
    )
    parser.add_argument(
        "--tta",
        action="store_true",
        help="average each image's P(dog) with its mirror image's (test-time augmentation)",
    )
    parser.add_argument(
        "--kaggle-submission",
        action="store_true",
        help="write id,label (label = P(dog)) for Kaggle's test1/N.jpg images instead",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.out:
        refuse_unsafe_output(args.out, args.inputs)
    model = check_classifier(load_model(args.model), args.model)
    files, rejected, reencode = collect_inputs(args.inputs)
    if args.out:  # the early check saw only the inputs given, not the files found in them
        refuse_unsafe_output(args.out, [*files, *(path for path, _ in rejected)])
    for path, reason in rejected:
        print(f"predict: skipped {path}: {reason}", file=sys.stderr)
    if not files:
        raise BadInputError("no readable images given")
    probs = predict_files(model, files, args.batch_size, reencode, args.tta)
    if args.kaggle_submission:
        unreadable = [path for path, _ in rejected if path.is_file()]
        write = partial(write_submission, rows=submission_rows(files, probs, unreadable))
    else:
        write = partial(write_predictions, files=files, probs=probs, threshold=args.threshold)
    if args.out:
        with atomic_file(args.out) as staging, staging.open("w", newline="") as handle:
            write(handle)
        dogs = int((probs >= args.threshold).sum())
        print(f"predict: {len(files)} images, {dogs} dogs, {len(files) - dogs} cats -> {args.out}")
    else:
        try:
            write(sys.stdout)
            sys.stdout.flush()
        except BrokenPipeError:  # `| head`: the reader has what it wanted
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit
            sys.exit(1)


if __name__ == "__main__":
    process.run(main)
