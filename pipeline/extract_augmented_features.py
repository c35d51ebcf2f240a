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
import sys

from pipeline import process
from pipeline.config import Config, load_config_or_exit
from pipeline.files import atomic_dir
from pipeline.images import list_split

DISABLED_MARKER = "disabled.json"


def write_disabled_output(cfg: Config) -> None:
    """The same bytes every time, so DVC sees nothing new downstream."""
    with atomic_dir(cfg.paths.augmented_features) as staging:
        (staging / DISABLED_MARKER).write_text(json.dumps({"include_augmented": False}) + "\n")


def extract_augmented(cfg: Config) -> None:
    # Imported here, not at the top: off by default, the stage then has no use for TensorFlow,
    # whose import is most of a disabled stage's time.
    import keras
    import mlflow

    from pipeline import devices, tracking
    from pipeline.features import extract_chunks, feature_dim, features_file, save_features
    from pipeline.models import in_current_precision

    paths, params = cfg.paths, cfg.features
    images = list_split(paths.augmented / "train")
    if not images:
        sys.exit(
            "extract_augmented_features: no augmented images; run the augment stage first "
            "(with augment.variants above 0), or set features.include_augmented: false"
        )
    plan, strategy = devices.configure_or_exit(cfg.compute)
    try:
        saved = keras.models.load_model(paths.models.backbone, compile=False)
    except (OSError, ValueError) as error:
        sys.exit(
            f"extract_augmented_features: cannot load {paths.models.backbone} ({error}); "
            "run the extract_features stage first"
        )
    with strategy.scope():
        backbone = in_current_precision(saved)
    batched = params.model_copy(update={"batch_size": plan.global_batch_size(params.batch_size)})
    sections = ("compute", "features")
    with tracking.stage_run("extract_augmented_features", cfg, *sections, system_metrics=True):
        mlflow.log_params(plan.params(params.batch_size))
        tracking.log_image_inputs(images, "augmented", "extraction")
        print(f"extract_augmented_features: {len(images)} augmented images")
        try:
            with atomic_dir(paths.augmented_features) as staging:
                chunks = extract_chunks(backbone, images, batched, plan.replicas)
                dim = feature_dim(backbone)
                save_features(
                    features_file(staging, "train"),
                    chunks,
                    dim,
                    images,
                    params.dtype,
                    params.compress,
                )
        except ValueError as error:  # the previous features stay in place
            mlflow.set_tag("error", str(error))
            sys.exit(f"extract_augmented_features: {error}")
        mlflow.log_metric("data/augmented_images", len(images))
    print(f"extract_augmented_features: {dim}-dim features into {paths.augmented_features}")


def main() -> None:
    cfg = load_config_or_exit()
    if not cfg.features.include_augmented:
        write_disabled_output(cfg)
        print("extract_augmented_features: off (features.include_augmented: false)")
        return
    extract_augmented(cfg)


if __name__ == "__main__":
    process.run(main)
