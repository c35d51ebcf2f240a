"""Stage: fine-tune the top of the backbone together with the trained head, on raw images.

The classic recipe: start from the trained head (a fine-tuned network needs a head that
already works, or its large gradients wreck the pretrained features), unfreeze the last
convolutional block of the backbone, and train both with SGD at a low learning rate
(docs/pipeline.md says what it reaches). Each epoch
runs the whole backbone forwards and its top backwards on every image, which on a laptop
CPU takes hours on the full dataset: `finetune.enabled` is off by default there.
"""

from __future__ import annotations

import shutil

from pipeline import plots, process, stage
from pipeline.config import Config, PathsConfig
from pipeline.errors import MissingInputError
from pipeline.files import MLFLOW_IDS_FILE, atomic_file, write_json
from pipeline.history import write_history


def write_disabled_outputs(paths: PathsConfig) -> None:
    """What DVC expects of the stage when it is off: the transfer model, and empty reports.

    A byte copy, not a Keras load and save: same hash, so DVC's cache stores it once.
    """
    with atomic_file(paths.models.finetuned) as staging:
        shutil.copyfile(paths.models.transfer, staging)
    reports = paths.reports.finetune
    write_history(reports / "history.csv", {})
    with atomic_file(reports / "history.png") as staging:
        plots.training_history({}, "fine-tuning disabled").savefig(staging)
    write_json(reports / "metrics.json", {})  # no model of its own: no metrics, no MLflow ids
    write_json(reports / MLFLOW_IDS_FILE, {})


def finetune(ctx: stage.Stage) -> None:
    # Imported here, not at the top: the stage is off by default, and then it has no use for
    # TensorFlow, whose import alone is most of a disabled stage's time (bench.incremental).
    import mlflow

    from pipeline.precision import for_inference
    from pipeline.training import fit, log_training_data, save_and_log

    paths = ctx.cfg.paths
    train, validation = finetune_images(paths, ctx.cfg.finetune.use_augmented, ctx.plan)
    model, unfrozen, datasets = prepare(ctx.cfg, ctx.plan, ctx.strategy, train, validation)
    mlflow.log_param("finetune.unfrozen", ",".join(unfrozen))
    log_training_data(train, validation)
    with datasets as (train_data, validation_data):
        history = fit(model, train_data, validation_data, ctx.cfg.finetune)
    models = {paths.models.finetuned: for_inference(model)}
    title = "fine-tuned backbone + head"
    summary = save_and_log(models, paths.models.finetuned, "finetuned", history, ctx.reports, title)
    print(
        f"finetune: {summary['epochs_run']} epochs with {', '.join(unfrozen)} unfrozen, best "
        f"validation accuracy {summary['val/accuracy']:.3f}; saved {paths.models.finetuned}"
    )


def finetune_images(paths: PathsConfig, use_augmented: bool, plan) -> tuple[list, list]:
    """The training images (with their variants, if asked) and the validation images,
    enough of each for `plan`'s devices."""
    from pipeline.images import list_split

    train = list_split(paths.split / "train")
    if use_augmented:
        train += list_split(paths.augmented / "train")
    validation = list_split(paths.split / "validation")
    if not train or not validation or not paths.models.head.is_file():
        raise MissingInputError(
            "needs the splits and a trained head; run the pipeline up to train_head"
        )
    plan.check_enough(training=len(train), validation=len(validation))
    return train, validation


def prepare(cfg: Config, plan, strategy, train: list, validation: list):
    """The model to train with the names of its unfrozen layers, and the datasets."""
    import keras

    from pipeline.datasets import training_datasets
    from pipeline.precision import in_current_precision
    from pipeline.transfer import build_finetune_model

    params, paths, seed = cfg.finetune, cfg.paths, cfg.common.seed
    keras.utils.set_random_seed(seed)
    saved = [
        keras.models.load_model(path, compile=False)
        for path in (paths.models.backbone, paths.models.head)
    ]
    with strategy.scope():
        # Copies in this machine's precision: the saved files keep the one they were written in.
        backbone, head = (in_current_precision(model) for model in saved)
        model, unfrozen = build_finetune_model(backbone, head, params, plan.steps_per_execution)
    size = backbone.input_shape[1:3]
    batch_size = plan.global_batch_size(params.batch_size)
    datasets = training_datasets(
        train, validation, size, batch_size, seed, cfg.compute.cache_images, plan.replicas
    )
    return model, unfrozen, datasets


def main() -> None:
    with stage.context(
        "finetune", batch_size=lambda cfg: cfg.finetune.batch_size, tracked=enabled
    ) as ctx:
        if enabled(ctx.cfg):
            finetune(ctx)
            return
        if not (transfer := ctx.cfg.paths.models.transfer).is_file():
            raise MissingInputError(f"{transfer} is missing; run train_head first")
        write_disabled_outputs(ctx.cfg.paths)
    print("finetune: disabled (finetune.enabled: false); the transfer model stands in")


def enabled(cfg: Config) -> bool:
    return cfg.finetune.enabled


if __name__ == "__main__":
    process.run(main)
