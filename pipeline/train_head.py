"""Stage 6: train the small dense head on the bottleneck features.

Training on stored features takes seconds per epoch where the full network would take
minutes. The stage also saves `transfer.keras`, backbone and head as one model that takes
raw images, for `pipeline.predict`.
"""

from __future__ import annotations

import sys

import keras
import mlflow
import numpy as np
import tensorflow as tf

from pipeline import tracking
from pipeline.config import ConfigError, load_config
from pipeline.extract_features import load_features
from pipeline.models import build_head, compose_transfer
from pipeline.training import fit, log_keras_model, save_model, save_training_outputs


def feature_dataset(
    features: np.ndarray, labels: np.ndarray, batch_size: int, shuffle_seed: int | None = None
):
    dataset = tf.data.Dataset.from_tensor_slices((features, labels.astype(np.float32)))
    if shuffle_seed is not None:
        dataset = dataset.shuffle(len(labels), seed=shuffle_seed, reshuffle_each_iteration=True)
    return dataset.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def main() -> None:
    try:
        cfg = load_config()
    except ConfigError as error:
        sys.exit(str(error))
    params, paths, seed = cfg.head, cfg.paths, cfg.common.seed
    try:
        train_x, train_y, _ = load_features(paths.features / "train.npz")
        val_x, val_y, _ = load_features(paths.features / "validation.npz")
    except FileNotFoundError as error:
        sys.exit(f"train_head: {error.filename} is missing; run the extract_features stage first")
    reports = paths.reports.train_head
    with tracking.stage_run("train_head", cfg, "common", "head"):
        keras.utils.set_random_seed(seed)
        head = build_head(train_x.shape[1], params)
        history = fit(
            head,
            feature_dataset(train_x, train_y, params.batch_size, shuffle_seed=seed),
            feature_dataset(val_x, val_y, params.batch_size),
            params,
        )
        summary = save_training_outputs(
            head, history, paths.models.head, reports, "VGG16 features + dense head"
        )
        backbone = keras.models.load_model(paths.models.backbone)
        transfer = compose_transfer(backbone, head)
        save_model(transfer, paths.models.transfer)
        mlflow.log_metrics(dict(summary))
        mlflow.log_metrics({"train_images": len(train_y), "validation_images": len(val_y)})
        mlflow.log_artifacts(str(reports), artifact_path="reports")
        log_keras_model(head, "head", val_x[:2])
    print(
        f"train_head: {summary['epochs_run']} epochs on {len(train_y)} feature vectors, best "
        f"epoch {summary['best_epoch']} with validation accuracy "
        f"{summary['best_val_accuracy']:.3f}; saved {paths.models.transfer}"
    )


if __name__ == "__main__":
    main()
