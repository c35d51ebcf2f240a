"""Stage 3: materialize augmented variants of the training images, and a preview grid.

Augmenting once per parameter set, instead of on the fly every epoch, is what makes later
experiments cheap: the scratch CNN reads the variants, and feature extraction can extract
features of them too, so even a bottleneck head benefits from augmentation. Every batch
draws its transforms from a seed derived from `common.seed`, so the same params give the
same images.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import keras
import mlflow
import numpy as np
import tensorflow as tf

from pipeline import plots, process, stage
from pipeline.config import AugmentConfig
from pipeline.datasets import image_dataset
from pipeline.errors import MissingInputError
from pipeline.files import atomic_dir, atomic_files, write_json
from pipeline.images import CLASS_NAMES, LabeledImage, list_split

BATCH_SIZE = 64
PREVIEW_IMAGES = 6
PREVIEW_VARIANTS = 5


def derive_seed(*parts: int) -> int:
    """A 31-bit seed from several integers, stable across runs and platforms."""
    seed = 0
    for part in parts:
        seed = (seed * 1_000_003 + part) % (2**31 - 1)
    return seed


def build_augmenter(cfg: AugmentConfig, seed: int) -> list[keras.layers.Layer]:
    """The Keras augmentation layers for `cfg`, each with its own seed."""
    # "nearest" fill, as in the tutorial: it repeats edge pixels rather than mirroring faces.
    fill = {"fill_mode": "nearest"}
    layers: list[keras.layers.Layer] = []
    if cfg.horizontal_flip:
        layers.append(keras.layers.RandomFlip("horizontal", seed=seed))
    if cfg.rotation:
        layers.append(keras.layers.RandomRotation(cfg.rotation, seed=seed + 1, **fill))
    if cfg.zoom:
        layers.append(keras.layers.RandomZoom(cfg.zoom, seed=seed + 2, **fill))
    if cfg.shift:
        layers.append(keras.layers.RandomTranslation(cfg.shift, cfg.shift, seed=seed + 3, **fill))
    if cfg.shear:
        layers.append(keras.layers.RandomShear(cfg.shear, cfg.shear, seed=seed + 4, **fill))
    return layers


def augment_batch(images: np.ndarray, cfg: AugmentConfig, seed: int) -> np.ndarray:
    """Random variants of a batch of 0-255 images, as uint8; the same seed gives the same output."""
    x = tf.convert_to_tensor(images, dtype=tf.float32)
    for layer in build_augmenter(cfg, seed):
        x = layer(x, training=True)
    return np.clip(np.rint(keras.ops.convert_to_numpy(x)), 0, 255).astype(np.uint8)


def variant_name(source: Path, variant: int) -> str:
    return f"{source.stem}_aug{variant}.jpg"


def generate_variants(
    images: list[LabeledImage], cfg: AugmentConfig, seed: int
) -> Iterator[tuple[LabeledImage, int, np.ndarray]]:
    """Yields `(source image, variant index, augmented pixels)` for every requested variant."""
    dataset = image_dataset(images, cfg.image_size, BATCH_SIZE)
    for variant in range(cfg.variants):
        offset = 0
        for batch_index, (batch, _labels) in enumerate(dataset):
            augmented = augment_batch(batch.numpy(), cfg, derive_seed(seed, variant, batch_index))
            for pixels in augmented:
                yield images[offset], variant, pixels
                offset += 1


def write_variants(images: list[LabeledImage], cfg: AugmentConfig, seed: int, target: Path) -> int:
    for name in CLASS_NAMES:
        (target / "train" / name).mkdir(parents=True, exist_ok=True)
    written = 0
    for source, variant, pixels in generate_variants(images, cfg, seed):
        folder = target / "train" / CLASS_NAMES[source.label]
        encoded = tf.io.encode_jpeg(pixels, quality=cfg.jpeg_quality)
        (folder / variant_name(source.path, variant)).write_bytes(encoded.numpy())
        written += 1
    return written


def preview(images: list[LabeledImage], cfg: AugmentConfig, seed: int) -> np.ndarray:
    """Originals in the first column, `PREVIEW_VARIANTS` variants beside each."""
    sample = images[:: max(1, len(images) // PREVIEW_IMAGES)][:PREVIEW_IMAGES]
    originals = next(iter(image_dataset(sample, cfg.image_size, len(sample))))[0].numpy()
    columns = [originals.astype(np.uint8)]
    columns += [
        augment_batch(originals, cfg, derive_seed(seed, 10_000 + v))
        for v in range(PREVIEW_VARIANTS)
    ]
    return np.stack(columns, axis=1)


def training_images(split: Path) -> list[LabeledImage]:
    if not (train := list_split(split / "train")):
        raise MissingInputError(f"no training images under {split / 'train'}; run the split stage")
    return train


def main() -> None:
    with stage.context("augment") as ctx:
        cfg, reports = ctx.cfg, ctx.reports
        train = training_images(cfg.paths.split)
        keras.utils.set_random_seed(cfg.common.seed)
        # The variants and their reports replace the previous ones together, or none does.
        with (
            atomic_dir(cfg.paths.augmented) as staging,
            atomic_files(reports / "preview.png", reports / "summary.json") as staged_reports,
        ):
            summary = write_outputs(train, cfg.augment, cfg.common.seed, staging, *staged_reports)
        mlflow.log_metrics({f"data/{name}": count for name, count in summary.items()})
    print(
        f"augment: {summary['variants_written']} variants of {len(train)} training images "
        f"({cfg.augment.variants} each) into {cfg.paths.augmented}; "
        f"preview in {reports / 'preview.png'}"
    )


def write_outputs(
    train: list[LabeledImage],
    cfg: AugmentConfig,
    seed: int,
    variants: Path,
    preview_file: Path,
    summary_file: Path,
) -> dict[str, int]:
    """The variants, their preview grid and their counts, which it returns."""
    written = write_variants(train, cfg, seed, variants)
    titles = ["original"] + [f"variant {v + 1}" for v in range(PREVIEW_VARIANTS)]
    plots.image_grid(preview(train, cfg, seed), titles).savefig(preview_file)
    summary = {"source_images": len(train), "variants_written": written}
    write_json(summary_file, summary)
    return summary


if __name__ == "__main__":
    process.run(main)
