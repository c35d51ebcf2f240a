"""Features files: computed a chunk at a time, streamed to disk in `np.savez`'s layout."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from devtools.fakes import write_kaggle_tree
from pipeline.datasets import image_dataset
from pipeline.features import extract, extract_chunks, feature_dim, load_features, save_features
from pipeline.images import LabeledImage
from tests.conftest import tiny_config


def labeled(paths: list[Path]) -> list[LabeledImage]:
    return [LabeledImage(path, int(path.name.startswith("dog"))) for path in paths]


def test_saved_chunks_load_back_as_one_array_with_labels_and_files(tmp_path: Path) -> None:
    images = labeled([tmp_path / f"{name}.{n}.jpg" for name in ("cat", "dog") for n in range(5)])
    features = np.random.default_rng(0).normal(size=(10, 6)).astype(np.float32)
    chunks = (features[i : i + 4] for i in range(0, 10, 4))  # 4 + 4 + 2 rows
    save_features(tmp_path / "train.npz", chunks, 6, images)

    loaded, labels, files = load_features(tmp_path / "train.npz")
    np.testing.assert_array_equal(loaded, features)
    assert loaded.dtype == np.float32
    assert labels.tolist() == [0] * 5 + [1] * 5 and labels.dtype == np.int8
    assert files.tolist() == [image.path.as_posix() for image in images]
    reference = tmp_path / "reference.npz"
    np.savez(reference, features=features, labels=labels, files=files)
    with np.load(reference) as expected, np.load(tmp_path / "train.npz") as ours:
        assert set(ours.files) == set(expected.files)


def test_compressed_features_are_smaller_and_load_the_same(tmp_path: Path) -> None:
    images = labeled([tmp_path / f"cat.{n}.jpg" for n in range(50)])
    rng = np.random.default_rng(0)
    # Like post-ReLU activations: non-negative, many exact zeros.
    features = np.maximum(rng.normal(size=(50, 512)), 0).astype(np.float32)
    save_features(tmp_path / "plain.npz", [features], 512, images, "float16")
    save_features(tmp_path / "deflated.npz", [features], 512, images, "float16", compress=True)

    plain, deflated = tmp_path / "plain.npz", tmp_path / "deflated.npz"
    assert deflated.stat().st_size < 0.8 * plain.stat().st_size
    for got, expected in zip(load_features(deflated), load_features(plain), strict=True):
        np.testing.assert_array_equal(got, expected)


def test_save_refuses_fewer_rows_than_images(tmp_path: Path) -> None:
    images = labeled([tmp_path / "cat.0.jpg", tmp_path / "dog.0.jpg"])
    with pytest.raises(ValueError, match="1 feature rows for 2 images"):
        save_features(tmp_path / "x.npz", [np.zeros((1, 3), np.float32)], 3, images)


def test_float16_storage_halves_the_file_and_loads_as_float32_or_as_stored(tmp_path: Path) -> None:
    images = labeled([tmp_path / f"cat.{n}.jpg" for n in range(50)])
    features = np.random.default_rng(0).gamma(1.0, 20.0, size=(50, 512)).astype(np.float32)
    save_features(tmp_path / "32.npz", [features], 512, images, "float32")
    save_features(tmp_path / "16.npz", [features], 512, images, "float16")

    loaded, _, _ = load_features(tmp_path / "16.npz")
    assert loaded.dtype == np.float32
    np.testing.assert_allclose(loaded, features, rtol=1e-3)
    as_stored, _, _ = load_features(tmp_path / "16.npz", dtype=None)  # as train_head holds them
    assert as_stored.dtype == np.float16
    np.testing.assert_array_equal(as_stored.astype(np.float32), loaded)
    assert (tmp_path / "16.npz").stat().st_size < 0.6 * (tmp_path / "32.npz").stat().st_size


@pytest.mark.parametrize("bad", [70000.0, np.nan])
def test_float16_storage_refuses_values_it_cannot_hold(tmp_path: Path, bad: float) -> None:
    images = labeled([tmp_path / "cat.0.jpg"])
    with pytest.raises(ValueError, match=r"set features\.dtype: float32"):
        save_features(
            tmp_path / "x.npz", [np.array([[1.0, bad]], np.float32)], 2, images, "float16"
        )


def test_chunked_extraction_matches_one_predict(tmp_path, monkeypatch) -> None:
    from pipeline.backbones import build_backbone

    images = labeled(write_kaggle_tree(tmp_path, per_class=4))
    cfg = tiny_config().features
    backbone = build_backbone(cfg)
    monkeypatch.setattr("pipeline.features.EXTRACT_CHUNK", 3)  # 3 + 3 + 2
    chunks = list(extract_chunks(backbone, images, cfg))
    assert [len(chunk) for chunk in chunks] == [3, 3, 2]
    monkeypatch.setattr("pipeline.features.EXTRACT_CHUNK", 100)
    whole = extract(backbone, images, cfg)
    assert whole.shape == (8, feature_dim(backbone))
    np.testing.assert_allclose(np.concatenate(chunks), whole, rtol=1e-4, atol=1e-4)


def test_a_last_batch_too_small_for_the_replicas_is_padded_and_trimmed(
    tmp_path, monkeypatch
) -> None:
    from pipeline.backbones import build_backbone

    images = labeled(write_kaggle_tree(tmp_path, per_class=4))[:7]  # batches of 3: 3, 3, 1
    cfg = tiny_config().features.model_copy(update={"batch_size": 3})
    backbone = build_backbone(cfg)
    plain = extract(backbone, images, cfg)
    predicted, real_dataset = [], image_dataset
    monkeypatch.setattr(
        "pipeline.features.image_dataset",
        lambda chunk, *args: predicted.append(chunk) or real_dataset(chunk, *args),
    )
    padded = extract(backbone, images, cfg, replicas=2)
    assert [len(chunk) for chunk in predicted] == [8]  # 3, 3, 2: one copy of the last image
    assert predicted[0][-1] == predicted[0][-2] == images[-1]
    np.testing.assert_allclose(padded, plain, rtol=1e-4, atol=1e-4)
