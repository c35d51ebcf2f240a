"""Stage 5b: backbone features of the augmented variants, when the head trains on them too.

Apart from `extract_features` so that stage does not depend on `data/augmented`: with
`features.include_augmented: false` (the default) an edit to the `augment` params then
re-runs this stage alone, which writes the same small marker again, and neither VGG16 over
every image nor the head runs for it. When on, it runs the backbone `extract_features`
saved, in this machine's precision, and writes `<paths.augmented_features>/train.npz`
in the layout of the other splits' features, which `train_head` appends to the train split.
"""

from __future__ import annotations

import json

from pipeline import process, stage
from pipeline.config import Config
from pipeline.errors import MissingInputError
from pipeline.files import atomic_dir
from pipeline.images import list_split

DISABLED_MARKER = "disabled.json"


def write_disabled_output(cfg: Config) -> None:
    """The same bytes every time, so DVC sees nothing new downstream."""
    with atomic_dir(cfg.paths.augmented_features) as staging:
        (staging / DISABLED_MARKER).write_text(json.dumps({"include_augmented": False}) + "\n")


def extract_augmented(ctx: stage.Stage) -> None:
    # Imported here, not at the top: off by default, the stage then has no use for TensorFlow,
    # whose import is most of a disabled stage's time.
    import keras
    import mlflow

    from pipeline import tracking
    from pipeline.features import extract_chunks, feature_dim, features_file, save_features
    from pipeline.precision import in_current_precision

    paths, params = ctx.cfg.paths, ctx.cfg.features
    images = list_split(paths.augmented / "train")
    if not images:
        raise MissingInputError(
            "no augmented images; run the augment stage first "
            "(with augment.variants above 0), or set features.include_augmented: false"
        )
    plan, strategy = ctx.plan, ctx.strategy
    try:
        saved = keras.models.load_model(paths.models.backbone, compile=False)
    except (OSError, ValueError) as error:
        raise MissingInputError(
            f"cannot load {paths.models.backbone} ({error}); run the extract_features stage first"
        ) from None
    with strategy.scope():
        backbone = in_current_precision(saved)
    batched = params.model_copy(update={"batch_size": plan.global_batch_size(params.batch_size)})
    tracking.log_image_inputs(images, "augmented", "extraction")
    print(f"extract_augmented_features: {len(images)} augmented images")
    dim = feature_dim(backbone)
    with atomic_dir(paths.augmented_features) as staging:
        chunks = extract_chunks(backbone, images, batched, plan.replicas)
        save_features(
            features_file(staging, "train"), chunks, dim, images, params.dtype, params.compress
        )
    mlflow.log_metric("data/augmented_images", len(images))
    print(f"extract_augmented_features: {dim}-dim features into {paths.augmented_features}")


def main() -> None:
    with stage.context(
        "extract_augmented_features",
        batch_size=lambda cfg: cfg.features.batch_size,
        tracked=included,
    ) as ctx:
        if not included(ctx.cfg):
            write_disabled_output(ctx.cfg)
            print("extract_augmented_features: off (features.include_augmented: false)")
            return
        extract_augmented(ctx)


def included(cfg: Config) -> bool:
    return cfg.features.include_augmented


if __name__ == "__main__":
    process.run(main)
