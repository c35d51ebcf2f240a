"""Stage 5: VGG16 bottleneck features of every split, computed once and reused by the head.

Writes `<paths.features>/<split>.npz` with `features`, `labels` and `files` side by side,
and the backbone itself to `models/backbone.keras`, so the end-to-end model uses exactly
the weights the features came from (also with `weights: none`). The augmented variants'
features, when the head uses them, come from the next stage, `extract_augmented_features`,
so that an edit to the augmentation does not re-run this one.
"""

from __future__ import annotations

import sys

import keras
import mlflow

from pipeline import devices, process, tracking
from pipeline.config import load_config_or_exit
from pipeline.features import extract_chunks, feature_dim, features_file, save_features
from pipeline.files import atomic_dir, atomic_file, write_json
from pipeline.images import SPLITS, list_split
from pipeline.models import WeightsUnavailableError, build_backbone, for_inference


def main() -> None:
    cfg = load_config_or_exit()
    plan, strategy = devices.configure_or_exit(cfg.compute)
    params, paths = cfg.features, cfg.paths
    images = {split: list_split(paths.split / split) for split in SPLITS}
    if not all(images.values()):
        sys.exit("extract_features: a split is empty; run the split stage first")
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
        dim = feature_dim(backbone)
        try:
            # The backbone beside the features it made: both replace the old ones, or neither.
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
        except ValueError as error:  # the previous features stay in place
            mlflow.set_tag("error", str(error))
            sys.exit(f"extract_features: {error}")
        summary = {"images": counts, "feature_dim": dim, "dtype": params.dtype}
        write_json(paths.reports.extract_features / "summary.json", summary)
        mlflow.log_metrics({f"data/{split}_images": n for split, n in counts.items()})
        mlflow.log_metric("data/feature_dim", summary["feature_dim"])
        mlflow.log_artifacts(str(paths.reports.extract_features), artifact_path="reports")
    print(
        f"extract_features: {summary['feature_dim']}-dim {params.backbone} features of "
        f"{sum(counts.values())} images into {paths.features}"
    )


if __name__ == "__main__":
    process.run(main)
