"""Generated photos and datasets: small, distinct for cats and dogs, never the real data."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image


def photo(label: int, seed: int, size: tuple[int, int] = (48, 40)) -> Image.Image:
    """A small RGB image a model can tell apart: cats warm and round, dogs cool and square."""
    rng = np.random.default_rng(seed)
    height, width = size[1], size[0]
    pixels = rng.normal(128, 30, (height, width, 3))
    yy, xx = np.mgrid[:height, :width]
    cy, cx, r = height / 2, width / 2, min(height, width) / 3
    if label == 0:
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 < r**2
        pixels[mask] = [220, 120, 60]
    else:
        mask = (abs(yy - cy) < r) & (abs(xx - cx) < r)
        pixels[mask] = [60, 120, 220]
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def jpeg_bytes(image: Image.Image, **save_args) -> bytes:
    out = io.BytesIO()
    image.save(out, format=save_args.pop("format", "JPEG"), **save_args)
    return out.getvalue()


def write_kaggle_tree(
    root: Path, per_class: int, start: int = 0, size: tuple[int, int] = (48, 40)
) -> list[Path]:
    """`root/train/cat.N.jpg` and `root/train/dog.N.jpg`, Kaggle's layout."""
    folder = root / "train"
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for label, name in enumerate(("cat", "dog")):
        for n in range(start, start + per_class):
            path = folder / f"{name}.{n}.jpg"
            path.write_bytes(jpeg_bytes(photo(label, seed=label * 10_000 + n, size=size)))
            paths.append(path)
    return paths
