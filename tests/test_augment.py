from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from devtools.fakes import write_kaggle_tree
from pipeline.augment import augment_batch, derive_seed, preview, write_variants
from pipeline.config import AugmentConfig
from pipeline.images import list_split
from tests.conftest import set_params, snapshot, write_split_folder

CFG = AugmentConfig(
    variants=2,
    image_size=(32, 32),
    horizontal_flip=True,
    rotation=0.1,
    zoom=0.2,
    shift=0.1,
    shear=0.2,
    jpeg_quality=90,
)


@pytest.fixture
def batch() -> np.ndarray:
    return np.random.default_rng(0).uniform(0, 255, (4, 32, 32, 3)).astype(np.float32)


def test_same_seed_gives_same_images(batch) -> None:
    first = augment_batch(batch, CFG, seed=5)
    assert first.dtype == np.uint8 and first.shape == batch.shape
    np.testing.assert_array_equal(first, augment_batch(batch, CFG, seed=5))
    assert not np.array_equal(first, augment_batch(batch, CFG, seed=6))


def test_no_transforms_leave_images_unchanged(batch) -> None:
    identity = CFG.model_copy(
        update={"horizontal_flip": False, "rotation": 0, "zoom": 0, "shift": 0, "shear": 0}
    )
    np.testing.assert_array_equal(
        augment_batch(batch, identity, 1), np.rint(batch).astype(np.uint8)
    )


def test_derive_seed_is_stable_and_distinct() -> None:
    assert derive_seed(42, 0, 1) == derive_seed(42, 0, 1)
    assert len({derive_seed(42, v, b) for v in range(3) for b in range(50)}) == 150


def test_variants_are_written_per_class_and_reproducible(tmp_path: Path) -> None:
    write_kaggle_tree(tmp_path / "src", per_class=3)
    train = tmp_path / "split" / "train"
    for path in (tmp_path / "src" / "train").iterdir():
        folder = train / ("cats" if path.name.startswith("cat") else "dogs")
        folder.mkdir(parents=True, exist_ok=True)
        path.rename(folder / path.name)
    images = list_split(train)
    assert write_variants(images, CFG, 42, tmp_path / "a") == 12
    write_variants(images, CFG, 42, tmp_path / "b")
    names = sorted(
        p.relative_to(tmp_path / "a").as_posix() for p in (tmp_path / "a").rglob("*.jpg")
    )
    assert names[0] == "train/cats/cat.0_aug0.jpg" and len(names) == 12
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
        # In its source's class folder, and its source's pixels: cats warm, dogs cool.
        folder, file = name.split("/")[1:]
        assert file.startswith(folder[:3])
        with Image.open(tmp_path / "a" / name) as variant:
            red, _, blue = np.asarray(variant, dtype=float).mean(axis=(0, 1))
        assert (red > blue) == (folder == "cats"), name
    grid = preview(images, CFG, 42)
    assert grid.shape[1:] == (6, 32, 32, 3)


def test_a_failure_before_the_preview_is_drawn_keeps_the_previous_variants_whole(
    stage_workspace: Path, monkeypatch
) -> None:
    from pipeline import augment

    write_split_folder(stage_workspace / "data/split/train", per_class=3)
    augment.main()
    outputs = (stage_workspace / "data/augmented", stage_workspace / "reports/augment")
    before = snapshot(*outputs)

    def fail(*_args):
        raise RuntimeError("no display")

    set_params(stage_workspace, "common", seed=7)  # other variants if it went through
    monkeypatch.setattr(augment.plots, "image_grid", fail)
    with pytest.raises(RuntimeError, match="no display"):
        augment.main()
    assert snapshot(*outputs) == before
