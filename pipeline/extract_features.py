"""Stage 5: VGG16 bottleneck features of every split, computed once and reused by the head.

Writes `<paths.features>/<split>.npz` with `features`, `labels` and `files` side by side,
and the backbone itself to `models/backbone.keras`, so the end-to-end model uses exactly
the weights the features came from (also with `weights: none`). The augmented variants'
features, when the head uses them, come from the next stage, `extract_augmented_features`,
so that an edit to the augmentation does not re-run this one.
"""

from __future__ import annotations

import math
import sys
import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import keras
import mlflow
import numpy as np

from pipeline import devices, process, tracking
from pipeline.config import FeaturesConfig, load_config_or_exit
from pipeline.datasets import image_dataset, left_out_of_last_batch
from pipeline.files import atomic_dir, atomic_file, write_json
from pipeline.images import SPLITS, LabeledImage, list_split
from pipeline.models import WeightsUnavailableError, build_backbone, for_inference

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
    # A progress bar: at 10-20 images/s on a laptop CPU, the train split takes a while.
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
    ReLU leaves make most of the gain, and higher levels add little at 3x the time.
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
            raise ValueError(f"{rows} feature rows for {len(images)} images")
        for name, array in (
            ("labels", np.array([image.label for image in images], dtype=np.int8)),
            ("files", np.array([image.path.as_posix() for image in images])),
        ):
            with archive.open(f"{name}.npy", "w", force_zip64=True) as entry:
                np.lib.format.write_array(entry, array)


def as_stored(chunk: np.ndarray, dtype: np.dtype) -> np.ndarray:
    largest = float(np.max(np.abs(chunk), initial=0.0))
    if not largest <= float(np.finfo(dtype).max):  # also catches NaN
        raise ValueError(
            f"features reach {largest:g}, beyond {dtype.name}'s range; "
            "set features.dtype: float32 in params.yaml"
        )
    return np.ascontiguousarray(chunk, dtype=dtype)


def load_features(
    path: Path, dtype: str | None = "float32"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`(features, labels, files)` as written by this stage; features as `dtype`, or as
    stored (`features.dtype`) for None."""
    with np.load(path) as data:
        features = data["features"]
        if dtype is not None:
            features = features.astype(dtype, copy=False)
        return features, data["labels"], data["files"]


def main() -> None:
    cfg = load_config_or_exit()
    plan, strategy = devices.configure_or_exit(cfg.compute)
    params, paths = cfg.features, cfg.paths
    images = {split: list_split(paths.split / split) for split in SPLITS}
    if not all(images.values()):
        sys.exit("extract_features: a split is empty; run the split stage first")
    sections = ("common", "compute", "features")
    with tracking.stage_run("extract_features", cfg, *sections, system_metrics=True):
        mlflow.log_params(plan.params(params.batch_size))
        keras.utils.set_random_seed(cfg.common.seed)  # random weights under `weights: none`
        try:
            with strategy.scope():
                backbone = build_backbone(params)
        except WeightsUnavailableError as error:
            mlflow.set_tag("error", str(error))
            sys.exit(f"extract_features: {error}")
        for split, split_images in images.items():
            tracking.log_image_inputs(split_images, split, "extraction")
        counts: dict[str, int] = {}
        global_batch = plan.global_batch_size(params.batch_size)
        batched = params.model_copy(update={"batch_size": global_batch})
        dim = feature_dim(backbone)
        try:
            # The backbone beside the features it made: both replace the old ones, or neither.
            with (
                atomic_dir(paths.features) as staging,
                atomic_file(paths.models.backbone) as backbone_staging,
            ):
                for split, split_images in images.items():
                    print(f"extract_features: {split} ({len(split_images)} images)")
                    chunks = extract_chunks(backbone, split_images, batched, plan.replicas)
                    save_features(
                        staging / f"{split}.npz",
                        chunks,
                        dim,
                        split_images,
                        params.dtype,
                        params.compress,
                    )
                    counts[split] = len(split_images)
                for_inference(backbone).save(backbone_staging)
        except ValueError as error:  # the previous features stay in place
            mlflow.set_tag("error", str(error))
            sys.exit(f"extract_features: {error}")
        summary = {"images": counts, "feature_dim": dim, "dtype": params.dtype}
        write_json(paths.reports.extract_features / "summary.json", summary)
        mlflow.log_metrics({f"{split}_images": n for split, n in counts.items()})
        mlflow.log_metric("feature_dim", summary["feature_dim"])
        mlflow.log_artifacts(str(paths.reports.extract_features), artifact_path="reports")
    print(
        f"extract_features: {summary['feature_dim']}-dim {params.backbone} features of "
        f"{sum(counts.values())} images into {paths.features}"
    )


if __name__ == "__main__":
    process.run(main)
