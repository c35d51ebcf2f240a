"""Stage 4: train the CNN from scratch on the training images (and, if asked, their variants).

Each epoch the model's own random layers flip, rotate, zoom and shift every image afresh
(`train_cnn.random_augment`); the tutorial's network and recipe are one preset away
(`presets/tutorial.txt`).
"""

from __future__ import annotations

import math

import keras

from pipeline import process, stage
from pipeline.cnn import build_cnn
from pipeline.config import Config, PathsConfig
from pipeline.datasets import training_datasets
from pipeline.devices import ComputePlan
from pipeline.errors import MissingInputError
from pipeline.images import LabeledImage, list_split
from pipeline.precision import for_inference
from pipeline.training import PreciseBatchNorm, fit, log_training_data, save_and_log


def main() -> None:
    with stage.context("train_cnn", batch_size=lambda cfg: cfg.train_cnn.batch_size) as ctx:
        paths = ctx.cfg.paths
        train, validation = training_images(paths, ctx.cfg.train_cnn.use_augmented, ctx.plan)
        log_training_data(train, validation)
        trained, history, recomputed = train_cnn(ctx.cfg, ctx.plan, ctx.strategy, train, validation)
        models = {paths.models.cnn: trained}
        summary = save_and_log(models, paths.models.cnn, "cnn", history, ctx.reports, "scratch CNN")
    statistics = f", batch norm's statistics recomputed on {recomputed} images each epoch"
    print(
        f"train_cnn: {summary['epochs_run']} epochs on {len(train)} images, best epoch "
        f"{summary['best_epoch']}{statistics if recomputed else ''}: validation accuracy "
        f"{summary['val/accuracy']:.3f}; saved {paths.models.cnn}"
    )


def training_images(
    paths: PathsConfig, use_augmented: bool, plan: ComputePlan
) -> tuple[list[LabeledImage], list[LabeledImage]]:
    """The training images (with their variants, if asked) and the validation images,
    enough of each for `plan`'s devices."""
    train = list_split(paths.split / "train")
    if use_augmented:
        train += list_split(paths.augmented / "train")
    validation = list_split(paths.split / "validation")
    if not train or not validation:
        raise MissingInputError("no training or validation images; run the split stage first")
    plan.check_enough(training=len(train), validation=len(validation))
    return train, validation


def train_cnn(
    cfg: Config,
    plan: ComputePlan,
    strategy,
    train: list[LabeledImage],
    validation: list[LabeledImage],
) -> tuple[keras.Model, dict[str, list[float]], int]:
    """The trained model for inference, its history, and on how many images batch norm's
    statistics were recomputed before each validation (0: none)."""
    params, seed = cfg.train_cnn, cfg.common.seed
    keras.utils.set_random_seed(seed)
    batch_size = plan.global_batch_size(params.batch_size)
    datasets = training_datasets(
        train, validation, params.image_size, batch_size, seed, cfg.compute.cache_images,
        plan.replicas,
    )  # fmt: skip
    with datasets as (train_data, validation_data):
        with strategy.scope():
            model = build_cnn(
                params,
                steps_per_epoch=math.ceil(len(train) / batch_size),
                steps_per_execution=plan.steps_per_execution,
                seed=seed,
            )
        precise_batch_norm = PreciseBatchNorm(train_data, params.batch_norm_recompute_images)
        history = fit(model, train_data, validation_data, params, callbacks=[precise_batch_norm])
    return for_inference(model), history, precise_batch_norm.images


if __name__ == "__main__":
    process.run(main)
