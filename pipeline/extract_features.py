"""Stage 5: VGG16 bottleneck features of every split, computed once and reused by the head.

Writes `<paths.features>/<split>.npz` with `features`, `labels` and `files` side by side,
and the backbone itself to `models/backbone.keras`, so the end-to-end model uses exactly
the weights the features came from (also with `weights: none`).
"""

from __future__ import annotations

import sys
from pathlib import Path

import keras
import mlflow
import numpy as np

from pipeline import devices, tracking
from pipeline.config import FeaturesConfig, load_config_or_exit
from pipeline.datasets import image_dataset
from pipeline.files import atomic_dir, write_json
from pipeline.images import SPLITS, LabeledImage, list_split
from pipeline.models import WeightsUnavailableError, build_backbone
from pipeline.training import save_model


def images_to_extract(
    split_root: Path, augmented_root: Path, include_augmented: bool
) -> dict[str, list[LabeledImage]]:
    images = {split: list_split(split_root / split) for split in SPLITS}
    if include_augmented:
        images["train"] += list_split(augmented_root / "train")
    return images


def extract(backbone: keras.Model, images: list[LabeledImage], cfg: FeaturesConfig) -> np.ndarray:
    """Backbone features of `images`, in order, one row per image."""
    dataset = image_dataset(images, cfg.image_size, cfg.batch_size)
    # A progress bar: at 10-20 images/s on a laptop CPU, the train split takes a while.
    return backbone.predict(dataset.map(lambda x, _y: x), verbose=1).astype(np.float32)


def save_features(path: Path, features: np.ndarray, images: list[LabeledImage]) -> None:
    np.savez(
        path,
        features=features,
        labels=np.array([image.label for image in images], dtype=np.int8),
        files=np.array([image.path.as_posix() for image in images]),
    )


def load_features(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`(features, labels, files)` as written by this stage."""
    with np.load(path) as data:
        return data["features"], data["labels"], data["files"]


def main() -> None:
    cfg = load_config_or_exit()
    plan, strategy = devices.configure_or_exit(cfg.compute)
    params, paths = cfg.features, cfg.paths
    images = images_to_extract(paths.split, paths.augmented, params.include_augmented)
    if not all(images.values()):
        sys.exit("extract_features: a split is empty; run the split stage first")
    if not plan.is_chief:
        return  # inference keeps no replicas in step: the chief extracts and writes everything
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
        with atomic_dir(paths.features) as staging:
            for split, split_images in images.items():
                print(f"extract_features: {split} ({len(split_images)} images)")
                features = extract(backbone, split_images, batched)
                save_features(staging / f"{split}.npz", features, split_images)
                counts[split] = len(split_images)
        save_model(backbone, paths.models.backbone)
        summary = {"images": counts, "feature_dim": int(features.shape[1])}
        write_json(paths.reports.extract_features / "summary.json", summary)
        mlflow.log_metrics({f"{split}_images": n for split, n in counts.items()})
        mlflow.log_metric("feature_dim", summary["feature_dim"])
        mlflow.log_artifacts(str(paths.reports.extract_features), artifact_path="reports")
    print(
        f"extract_features: {summary['feature_dim']}-dim {params.backbone} features of "
        f"{sum(counts.values())} images into {paths.features}"
    )


if __name__ == "__main__":
    main()
