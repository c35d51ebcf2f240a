"""The augmented variants' features: a marker when off, the other splits' layout when on."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline import extract_augmented_features
from pipeline.errors import MissingInputError
from pipeline.features import extract, load_features, save_features
from pipeline.images import LabeledImage
from pipeline.train_head import load_training_features
from tests.conftest import run_stage_without_tensorflow, set_params, tiny_config, write_split_folder


def test_off_it_writes_the_same_marker_each_time_without_importing_tensorflow(
    stage_workspace: Path,
) -> None:
    outputs = []
    for _ in range(2):
        printed = run_stage_without_tensorflow("extract_augmented_features", stage_workspace)
        assert "off (features.include_augmented: false)" in printed
        folder = stage_workspace / "data" / "augmented_features"
        outputs.append({path.name: path.read_bytes() for path in folder.iterdir()})
    assert outputs[0] == outputs[1]  # DVC then sees nothing new for train_head
    assert list(outputs[0]) == [extract_augmented_features.DISABLED_MARKER]


def test_on_without_augmented_images_exits_with_a_hint(stage_workspace: Path) -> None:
    set_params(stage_workspace, "features", include_augmented=True)
    with pytest.raises(MissingInputError, match="run the augment stage first"):
        extract_augmented_features.main()
    assert not (stage_workspace / "data" / "augmented_features").exists()


def test_on_it_extracts_with_the_saved_backbone_and_the_head_trains_on_both(
    stage_workspace: Path,
) -> None:
    from pipeline.backbones import build_backbone
    from pipeline.precision import for_inference

    set_params(stage_workspace, "features", include_augmented=True)
    cfg = tiny_config().features
    data = stage_workspace / "data"
    images = write_split_folder(data / "augmented" / "train", per_class=3)
    backbone = build_backbone(cfg)
    (stage_workspace / "models").mkdir()
    for_inference(backbone).save(stage_workspace / "models" / "backbone.keras")

    extract_augmented_features.main()

    features, labels, files = load_features(data / "augmented_features" / "train.npz")
    np.testing.assert_allclose(features, extract(backbone, images, cfg), rtol=1e-2, atol=1e-2)
    assert labels.tolist() == [image.label for image in images] == [0, 0, 0, 1, 1, 1]
    # As the stage lists them, relative to the repository like every path in params.yaml.
    assert files.tolist() == [i.path.relative_to(stage_workspace).as_posix() for i in images]

    # train_head appends them to the train split's own features.
    split_images = [LabeledImage(Path(f"train/cats/{n}.jpg"), 0) for n in range(2)]
    (data / "features").mkdir()
    own = np.ones((2, features.shape[1]), np.float32)
    save_features(data / "features" / "train.npz", [own], features.shape[1], split_images)
    combined, combined_labels, combined_files = load_training_features(
        data / "features", data / "augmented_features"
    )
    assert len(combined) == len(combined_labels) == len(combined_files) == 2 + len(images)
    np.testing.assert_array_equal(combined[:2], own)
    assert combined_labels.tolist() == [0, 0, *labels.tolist()]


def test_off_the_head_trains_on_the_train_split_alone(stage_workspace: Path) -> None:
    extract_augmented_features.main()
    data = stage_workspace / "data"
    split_images = [LabeledImage(Path(f"train/cats/{n}.jpg"), 0) for n in range(2)]
    (data / "features").mkdir()
    save_features(data / "features" / "train.npz", [np.ones((2, 3))], 3, split_images)
    features, labels, _ = load_training_features(data / "features", data / "augmented_features")
    assert features.shape == (2, 3) and labels.tolist() == [0, 0]
