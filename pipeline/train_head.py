"""Stage 6: train the small dense head on the bottleneck features.

Training on stored features takes seconds per epoch where the full network would take
minutes. The stage also saves `transfer.keras`, backbone and head as one model that takes
raw images, for `pipeline.predict`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import keras
import mlflow
import numpy as np
import tensorflow as tf

from pipeline import devices, process, tracking
from pipeline.config import load_config_or_exit
from pipeline.datasets import splittable_over_replicas
from pipeline.features import features_file, load_features
from pipeline.images import LabeledImage
from pipeline.models import build_head, compose_transfer, for_inference
from pipeline.training import fit, log_and_record_model, save_training_outputs


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
    holding a second copy of every row (`bench.memory`: train_head's peak at 16,000 images'
    VGG16 features, 11,200 + 3,200 vectors of 8,192: 1,480 MiB, against 2,347 before).
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
    cfg = load_config_or_exit()
    plan, strategy = devices.configure_or_exit(cfg.compute, cpu_bfloat16_pays=False)
    params, paths, seed = cfg.head, cfg.paths, cfg.common.seed
    try:
        train_x, train_y, train_files = load_training_features(
            paths.features, paths.augmented_features
        )
        val_x, val_y, val_files = load_features(
            features_file(paths.features, "validation"), dtype=None
        )
    except FileNotFoundError as error:
        sys.exit(f"train_head: {error.filename} is missing; run the extract_features stage first")
    plan.exit_if_too_few("train_head", training=len(train_y), validation=len(val_y))
    reports = paths.reports.train_head
    keras.utils.set_random_seed(seed)
    batch_size = plan.global_batch_size(params.batch_size)
    train_data = feature_dataset(train_x, train_y, batch_size, seed, plan.replicas)
    validation_data = feature_dataset(val_x, val_y, batch_size, replicas=plan.replicas)
    feature_length = train_x.shape[1]
    del train_x, val_x  # the datasets hold their own copies
    try:  # before training: without it there is no transfer model to save beside the head
        backbone = keras.models.load_model(paths.models.backbone)
    except (OSError, ValueError) as error:
        sys.exit(f"train_head: cannot load {paths.models.backbone} ({error}); run extract_features")
    with strategy.scope():
        head = build_head(feature_length, params, plan.steps_per_execution)
    with tracking.stage_run("train_head", cfg, "common", "compute", "head", system_metrics=True):
        mlflow.log_params(plan.params(params.batch_size))
        tracking.log_image_inputs(as_images(train_files, train_y), "features/train", "training")
        tracking.log_image_inputs(as_images(val_files, val_y), "features/validation", "validation")
        history = fit(head, train_data, validation_data, params)
        trained = for_inference(head)
        transfer = compose_transfer(backbone, trained)
        summary = save_training_outputs(
            {paths.models.head: trained, paths.models.transfer: transfer},
            history,
            reports,
            "VGG16 features + dense head",
        )
        mlflow.log_metrics(
            {"data/train_images": len(train_y), "data/validation_images": len(val_y)}
        )
        mlflow.log_artifacts(str(reports), artifact_path="reports")
        # The end-to-end model is the one to register and serve: it takes raw images.
        log_and_record_model(transfer, paths.models.transfer, "transfer", reports, summary)
    print(
        f"train_head: {summary['epochs_run']} epochs on {len(train_y)} feature vectors, best "
        f"epoch {summary['best_epoch']} with validation accuracy "
        f"{summary['val/accuracy']:.3f}; saved {paths.models.transfer}"
    )


if __name__ == "__main__":
    process.run(main)
