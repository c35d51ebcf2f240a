"""Stage 5: VGG16 bottleneck features of every split, computed once and reused by the head.

Writes `<paths.features>/<split>.npz` with `features`, `labels` and `files` side by side,
and the backbone itself to `models/backbone.keras`, so the end-to-end model uses exactly
the weights the features came from (also with `weights: none`). The augmented variants'
features, when the head uses them, come from the next stage, `extract_augmented_features`,
so that an edit to the augmentation does not re-run this one.
"""

from __future__ import annotations

import keras
import mlflow

from pipeline import process, stage, tracking
from pipeline.backbones import build_backbone
from pipeline.config import FeaturesConfig, PathsConfig
from pipeline.devices import ComputePlan
from pipeline.errors import MissingInputError
from pipeline.features import extract_chunks, feature_dim, features_file, save_features
from pipeline.files import atomic_dir, atomic_file, write_json
from pipeline.images import SPLITS, LabeledImage, list_split
from pipeline.precision import for_inference


def main() -> None:
    with stage.context("extract_features", batch_size=lambda cfg: cfg.features.batch_size) as ctx:
        params, paths = ctx.cfg.features, ctx.cfg.paths
        images = images_by_split(paths)
        for split, listed in images.items():
            tracking.log_image_inputs(listed, split, "extraction")
        keras.utils.set_random_seed(ctx.cfg.common.seed)  # random weights under `weights: none`
        with ctx.strategy.scope():
            backbone = build_backbone(params)
        counts = write_features(backbone, images, params, ctx.plan, paths)
        summary = {"images": counts, "feature_dim": feature_dim(backbone), "dtype": params.dtype}
        write_json(ctx.reports / "summary.json", summary)
        mlflow.log_metrics({f"data/{split}_images": n for split, n in counts.items()})
        mlflow.log_metric("data/feature_dim", summary["feature_dim"])
    print(
        f"extract_features: {summary['feature_dim']}-dim {params.backbone} features of "
        f"{sum(counts.values())} images into {paths.features}"
    )


def images_by_split(paths: PathsConfig) -> dict[str, list[LabeledImage]]:
    images = {split: list_split(paths.split / split) for split in SPLITS}
    if not all(images.values()):
        raise MissingInputError("a split is empty; run the split stage first")
    return images


def write_features(
    backbone: keras.Model,
    images: dict[str, list[LabeledImage]],
    params: FeaturesConfig,
    plan: ComputePlan,
    paths: PathsConfig,
) -> dict[str, int]:
    """Every split's features, and the backbone beside them: both replace the old ones, or
    neither does. Returns the images per split."""
    batched = params.model_copy(update={"batch_size": plan.global_batch_size(params.batch_size)})
    dim = feature_dim(backbone)
    counts: dict[str, int] = {}
    with (
        atomic_dir(paths.features) as staging,
        atomic_file(paths.models.backbone) as backbone_staging,
    ):
        for split, split_images in images.items():
            print(f"extract_features: {split} ({len(split_images)} images)")
            chunks = extract_chunks(backbone, split_images, batched, plan.replicas)
            save_features(
                features_file(staging, split),
                chunks,
                dim,
                split_images,
                params.dtype,
                params.compress,
            )
            counts[split] = len(split_images)
        for_inference(backbone).save(backbone_staging)
    return counts


if __name__ == "__main__":
    process.run(main)
