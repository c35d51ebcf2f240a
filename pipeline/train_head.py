"""Stage 6: train the small dense head on the bottleneck features.

Training on stored features takes seconds per epoch where the full network would take
minutes. The stage also saves `transfer.keras`, backbone and head as one model that takes
raw images, for `pipeline.predict`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from pipeline import process, stage
from pipeline.config import HeadConfig, PathsConfig
from pipeline.datasets import splittable_over_replicas
from pipeline.devices import ComputePlan
from pipeline.errors import MissingInputError
from pipeline.features import features_file, load_features
from pipeline.images import LabeledImage
from pipeline.precision import for_inference
from pipeline.training import fit, log_training_data, save_and_log
from pipeline.transfer import build_head, compose_transfer


def feature_dataset(
    features: np.ndarray,
    labels: np.ndarray,
    batch_size: int,
    shuffle_seed: int | None = None,
    replicas: int = 1,
):
    """Batches of `(float32 features, labels)`; with several replicas, see
    `splittable_over_replicas`.

    The features are held in the dtype they were stored in (float16 by default, half of
    float32), in host memory, and each batch is gathered by index and cast. Shuffling
    shuffles the indices: the same order as shuffling the rows, without a shuffle buffer
    holding a second copy of every row (`bench.memory` measures train_head's peak).
    """
    with tf.device("/CPU:0"):  # tf.data reads them on the host; no copy on a GPU
        rows = tf.constant(features)
        targets = tf.constant(labels.astype(np.float32))
    indices = tf.data.Dataset.range(len(labels))
    if shuffle_seed is not None:
        indices = indices.shuffle(len(labels), seed=shuffle_seed, reshuffle_each_iteration=True)
    indices = splittable_over_replicas(indices, len(labels), batch_size, replicas)
    return (
        indices.batch(batch_size)
        .map(
            lambda batch: (tf.cast(tf.gather(rows, batch), tf.float32), tf.gather(targets, batch)),
            num_parallel_calls=tf.data.AUTOTUNE,
        )
        .prefetch(tf.data.AUTOTUNE)
    )


def load_training_features(
    features: Path, augmented_features: Path
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The train split's `(features, labels, files)` as stored, followed by the augmented
    variants' when `extract_augmented_features` wrote them (`features.include_augmented`)."""
    parts = [load_features(features_file(features, "train"), dtype=None)]
    if (augmented := features_file(augmented_features, "train")).is_file():
        parts.append(load_features(augmented, dtype=None))
    if len(parts) == 1:
        return parts[0]
    return tuple(np.concatenate(arrays) for arrays in zip(*parts, strict=True))


def as_images(files: np.ndarray, labels: np.ndarray) -> list[LabeledImage]:
    return [LabeledImage(Path(str(f)), int(y)) for f, y in zip(files, labels, strict=True)]


def main() -> None:
    with stage.context(
        "train_head", batch_size=lambda cfg: cfg.head.batch_size, cpu_bfloat16_pays=False
    ) as ctx:
        paths = ctx.cfg.paths
        inputs = head_inputs(paths, ctx.plan, ctx.cfg.head.batch_size, ctx.cfg.common.seed)
        backbone = load_backbone(paths.models.backbone)
        log_training_data(inputs.train_images, inputs.validation_images, prefix="features/")
        head, history = train_head(ctx.cfg.head, ctx.plan, ctx.strategy, inputs)
        models = {paths.models.head: head, paths.models.transfer: compose_transfer(backbone, head)}
        # The end-to-end model is the one to register and serve: it takes raw images.
        served, title = paths.models.transfer, "VGG16 features + dense head"
        summary = save_and_log(models, served, "transfer", history, ctx.reports, title)
    print(
        f"train_head: {summary['epochs_run']} epochs on {len(inputs.train_images)} feature "
        f"vectors, best epoch {summary['best_epoch']} with validation accuracy "
        f"{summary['val/accuracy']:.3f}; saved {paths.models.transfer}"
    )


def train_head(
    params: HeadConfig, plan: ComputePlan, strategy, inputs: HeadInputs
) -> tuple[keras.Model, dict[str, list[float]]]:
    """The trained head, for inference, and its history."""
    with strategy.scope():
        head = build_head(inputs.feature_length, params, plan.steps_per_execution)
    history = fit(head, inputs.train, inputs.validation, params)
    return for_inference(head), history


@dataclass(frozen=True)
class HeadInputs:
    train: tf.data.Dataset
    validation: tf.data.Dataset
    feature_length: int
    train_images: list[LabeledImage]
    validation_images: list[LabeledImage]


def head_inputs(paths: PathsConfig, plan: ComputePlan, batch_size: int, seed: int) -> HeadInputs:
    """The stored features as datasets for `plan`; the arrays they were read into are let go
    on return, since the datasets hold their own copies."""
    # Seeded first: the shuffle's order depends on the global seed too, not only on its own.
    keras.utils.set_random_seed(seed)
    try:
        train_x, train_y, train_files = load_training_features(
            paths.features, paths.augmented_features
        )
        val_x, val_y, val_files = load_features(
            features_file(paths.features, "validation"), dtype=None
        )
    except FileNotFoundError as error:
        raise MissingInputError(
            f"{error.filename} is missing; run the extract_features stage first"
        ) from None
    plan.check_enough(training=len(train_y), validation=len(val_y))
    batch_size = plan.global_batch_size(batch_size)
    return HeadInputs(
        feature_dataset(train_x, train_y, batch_size, seed, plan.replicas),
        feature_dataset(val_x, val_y, batch_size, replicas=plan.replicas),
        train_x.shape[1],
        as_images(train_files, train_y),
        as_images(val_files, val_y),
    )


def load_backbone(path: Path) -> keras.Model:
    """The backbone the features came from, loaded before training: without it there is no
    transfer model to save beside the head."""
    try:
        return keras.models.load_model(path)
    except (OSError, ValueError) as error:
        raise MissingInputError(f"cannot load {path} ({error}); run extract_features") from None


if __name__ == "__main__":
    process.run(main)
