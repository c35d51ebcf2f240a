"""Backbone features files: computed a chunk at a time, stored, and read back.

Shared by the stages that write features (`extract_features`, `extract_augmented_features`)
and those that read them (`train_head`, `evaluate`), so no stage imports another.
A features file holds `features`, `labels` and `files` side by side, in `np.savez`'s layout.
"""

from __future__ import annotations

import math
import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import keras
import numpy as np

from pipeline.config import FeaturesConfig
from pipeline.datasets import image_dataset, left_out_of_last_batch
from pipeline.errors import PipelineError
from pipeline.images import LabeledImage


class FeaturesError(PipelineError, ValueError):
    """The features cannot be stored as asked; the previous ones stay in place."""


def features_file(folder: Path, split: str) -> Path:
    """Where a split's features live: `<paths.features>/<split>.npz`, and the augmented
    variants' `<paths.augmented_features>/train.npz`."""
    return folder / f"{split}.npz"


# Images per `predict` call: bounds the features held in memory (32 MiB of VGG16's at 150x150)
# while the rest stream to disk.
EXTRACT_CHUNK = 1024


def extract_chunks(
    backbone: keras.Model, images: list[LabeledImage], cfg: FeaturesConfig, replicas: int = 1
) -> Iterator[np.ndarray]:
    """Backbone features of `images`, in order, one row per image, a chunk at a time.

    `cfg.batch_size` is the global batch. With several replicas, a last batch that would
    leave one of them without an image is padded with copies of its last image, whose
    features are then dropped.
    """
    # A progress bar: on a laptop CPU the train split takes a while.
    progress = keras.utils.Progbar(len(images), unit_name="image")
    for start in range(0, len(images), EXTRACT_CHUNK):
        chunk = images[start : start + EXTRACT_CHUNK]
        left_out = left_out_of_last_batch(len(chunk), cfg.batch_size, replicas)
        padded = chunk + [chunk[-1]] * (replicas - left_out if left_out else 0)
        dataset = image_dataset(padded, cfg.image_size, cfg.batch_size).map(lambda x, _y: x)
        features = backbone.predict(dataset, verbose=0)[: len(chunk)]
        progress.add(len(chunk))
        yield features.reshape(len(chunk), -1).astype(np.float32, copy=False)


def extract(
    backbone: keras.Model, images: list[LabeledImage], cfg: FeaturesConfig, replicas: int = 1
) -> np.ndarray:
    """All of `images`' features in one array (for a few images; the stage streams them)."""
    return np.concatenate(list(extract_chunks(backbone, images, cfg, replicas)))


def feature_dim(backbone: keras.Model) -> int:
    return math.prod(backbone.output_shape[1:])


def save_features(
    path: Path,
    chunks: Iterable[np.ndarray],
    dim: int,
    images: list[LabeledImage],
    dtype: str = "float32",
    compress: bool = False,
) -> None:
    """`np.savez`'s layout, with the features written chunk by chunk as they are computed.

    Memory holds one chunk, not every image's features (1.4 GB for 45,000 images at 150x150).
    `float16` halves the file: its 11-bit mantissa keeps features to 0.05%, far below
    what moves a dense head's decision; values beyond its range are refused, not clipped.
    `compress` deflates it, as `np.savez_compressed` does, at the fastest level: the zeros
    ReLU leaves make most of the gain, and higher levels add little at several times the time.
    """
    stored = np.dtype(dtype)
    header = {"descr": stored.str, "fortran_order": False, "shape": (len(images), dim)}
    method = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    with zipfile.ZipFile(path, "w", method, allowZip64=True, compresslevel=1) as archive:
        with archive.open("features.npy", "w", force_zip64=True) as entry:
            np.lib.format.write_array_header_2_0(entry, header)
            rows = 0
            for chunk in chunks:
                entry.write(as_stored(chunk, stored).tobytes())
                rows += len(chunk)
        if rows != len(images):
            raise FeaturesError(f"{rows} feature rows for {len(images)} images")
        for name, array in (
            ("labels", np.array([image.label for image in images], dtype=np.int8)),
            ("files", np.array([image.path.as_posix() for image in images])),
        ):
            with archive.open(f"{name}.npy", "w", force_zip64=True) as entry:
                np.lib.format.write_array(entry, array)


def as_stored(chunk: np.ndarray, dtype: np.dtype) -> np.ndarray:
    largest = float(np.max(np.abs(chunk), initial=0.0))
    if not largest <= float(np.finfo(dtype).max):  # also catches NaN
        raise FeaturesError(
            f"features reach {largest:g}, beyond {dtype.name}'s range; "
            "set features.dtype: float32 in params.yaml"
        )
    return np.ascontiguousarray(chunk, dtype=dtype)


def load_features(
    path: Path, dtype: str | None = "float32"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`(features, labels, files)` as `save_features` wrote them; features as `dtype`, or as
    stored (`features.dtype`) for None."""
    with np.load(path) as data:
        features = data["features"]
        if dtype is not None:
            features = features.astype(dtype, copy=False)
        return features, data["labels"], data["files"]
