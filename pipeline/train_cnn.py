"""Stage 4: train the CNN from scratch on the training images (and, if asked, their variants).

Each epoch the model's own random layers flip, rotate, zoom and shift every image afresh
(`train_cnn.random_augment`); the tutorial's network and recipe are one preset away
(`presets/tutorial.txt`).
"""

from __future__ import annotations

import math
import sys

import keras
import mlflow

from pipeline import devices, process, tracking
from pipeline.config import load_config_or_exit
from pipeline.datasets import training_datasets
from pipeline.images import list_split
from pipeline.models import build_cnn, for_inference
from pipeline.training import PreciseBatchNorm, fit, log_and_record_model, save_training_outputs


def main() -> None:
    cfg = load_config_or_exit()
    plan, strategy = devices.configure_or_exit(cfg.compute)
    params, paths, seed = cfg.train_cnn, cfg.paths, cfg.common.seed
    train = list_split(paths.split / "train")
    if params.use_augmented:
        train += list_split(paths.augmented / "train")
    validation = list_split(paths.split / "validation")
    if not train or not validation:
        sys.exit("train_cnn: no training or validation images; run the split stage first")
    plan.exit_if_too_few("train_cnn", training=len(train), validation=len(validation))
    reports = paths.reports.train_cnn
    keras.utils.set_random_seed(seed)
    batch_size = plan.global_batch_size(params.batch_size)
    datasets = training_datasets(
        train,
        validation,
        params.image_size,
        batch_size,
        seed,
        cfg.compute.cache_images,
        plan.replicas,
    )
    with datasets as (train_data, validation_data):
        with strategy.scope():
            model = build_cnn(
                params,
                steps_per_epoch=math.ceil(len(train) / batch_size),
                steps_per_execution=plan.steps_per_execution,
                seed=seed,
            )
        sections = ("common", "compute", "train_cnn")
        with tracking.stage_run("train_cnn", cfg, *sections, system_metrics=True):
            mlflow.log_params(plan.params(params.batch_size))
            tracking.log_image_inputs(train, "train", "training")
            tracking.log_image_inputs(validation, "validation", "validation")
            precise_batch_norm = PreciseBatchNorm(train_data, params.batch_norm_recompute_images)
            history = fit(
                model, train_data, validation_data, params, callbacks=[precise_batch_norm]
            )
            trained = for_inference(model)
            summary = save_training_outputs(
                {paths.models.cnn: trained}, history, reports, "scratch CNN"
            )
            mlflow.log_metrics(
                {"data/train_images": len(train), "data/validation_images": len(validation)}
            )
            mlflow.log_artifacts(str(reports), artifact_path="reports")
            log_and_record_model(trained, paths.models.cnn, "cnn", reports, summary)
    statistics = (
        f", batch norm's statistics recomputed on {precise_batch_norm.images} images each epoch"
        if precise_batch_norm.images
        else ""
    )
    print(
        f"train_cnn: {summary['epochs_run']} epochs on {len(train)} images, best epoch "
        f"{summary['best_epoch']}{statistics}: validation accuracy {summary['val/accuracy']:.3f}; "
        f"saved {paths.models.cnn}"
    )


if __name__ == "__main__":
    process.run(main)
