from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pytest

from pipeline.backbones import (
    WeightsUnavailableError,
    build_backbone,
    caffe_preprocessing,
    resolve_weights,
)
from tests.conftest import tiny_config

FEATURES = tiny_config().features


def test_caffe_preprocessing_matches_keras_vgg16_preprocess_input() -> None:
    pixels = np.random.default_rng(0).uniform(0, 255, (2, 5, 5, 3)).astype("float32")
    expected = keras.applications.vgg16.preprocess_input(pixels.copy())
    np.testing.assert_allclose(caffe_preprocessing()(pixels), expected, rtol=1e-5, atol=1e-3)


def test_avg_pooling_gives_one_value_per_channel() -> None:
    backbone = build_backbone(
        FEATURES.model_copy(update={"pooling": "avg", "image_size": (64, 64)})
    )
    assert backbone.output_shape == (None, 512)


def test_missing_weights_file_is_a_clear_error(tmp_path: Path) -> None:
    cfg = FEATURES.model_copy(update={"weights": str(tmp_path / "vgg16.h5")})
    with pytest.raises(WeightsUnavailableError, match="does not exist"):
        build_backbone(cfg)


def test_a_relative_weights_path_is_the_repositorys_also_from_a_dvc_temp_copy(
    tmp_path: Path, monkeypatch
) -> None:
    repository = tmp_path / "repo"
    (repository / "weights").mkdir(parents=True)
    (repository / "weights/vgg16.h5").write_bytes(b"weights")
    temp_copy = repository / ".dvc/tmp/exps/tmpabc"  # where a queued experiment runs
    temp_copy.mkdir(parents=True)
    monkeypatch.chdir(temp_copy)
    monkeypatch.setenv("DVC_ROOT", str(repository))
    assert resolve_weights("weights/vgg16.h5") == str(repository / "weights/vgg16.h5")
    assert resolve_weights("none") is None and resolve_weights("imagenet") == "imagenet"


def test_efficientnet_weights_from_a_path_are_refused_with_the_way_that_works(tmp_path) -> None:
    weights = tmp_path / "efficientnetb0_notop.h5"
    weights.write_bytes(b"not read")
    cfg = FEATURES.model_copy(update={"backbone": "efficientnet_b0", "weights": str(weights)})
    with pytest.raises(WeightsUnavailableError, match=r"~/\.keras/models/efficientnetb0_notop"):
        build_backbone(cfg)


def test_failed_imagenet_download_names_the_fixes(monkeypatch) -> None:
    def offline(*args, **kwargs):
        raise Exception("URL fetch failure on https://storage.googleapis.com/...: None")

    monkeypatch.setattr(keras.applications, "VGG16", offline)
    with pytest.raises(WeightsUnavailableError) as error:
        build_backbone(FEATURES.model_copy(update={"weights": "imagenet"}))
    message = str(error.value)
    assert "URL fetch failure" in message
    assert "features.weights to its path" in message and "features.weights to none" in message


@pytest.mark.parametrize(
    ("backbone", "size", "features", "preprocessing"),
    [
        ("vgg16", 32, 512, "caffe_preprocess"),
        ("resnet50", 32, 2048, "caffe_preprocess"),
        ("mobilenet_v2", 32, 1280, "tf_preprocess"),
        ("efficientnet_b0", 32, 1280, None),  # it rescales inside its own graph
        ("xception", 71, 2048, "tf_preprocess"),
    ],
)
def test_every_backbone_builds_with_its_preprocessing(
    backbone, size, features, preprocessing
) -> None:
    cfg = FEATURES.model_copy(
        update={"backbone": backbone, "image_size": (size, size), "pooling": "avg"}
    )
    model = build_backbone(cfg)
    assert model.name == f"{backbone}_features"
    assert model.output_shape == (None, features)
    names = {layer.name for layer in model.layers}
    assert {"caffe_preprocess", "tf_preprocess"} & names == ({preprocessing} - {None})
    images = np.random.default_rng(0).uniform(0, 255, (1, size, size, 3)).astype("float32")
    assert np.all(np.isfinite(model.predict(images, verbose=0)))


def test_tf_mode_preprocessing_matches_keras() -> None:
    from pipeline.backbones import tf_preprocessing

    pixels = np.random.default_rng(0).uniform(0, 255, (2, 4, 4, 3)).astype("float32")
    expected = keras.applications.mobilenet_v2.preprocess_input(pixels.copy())
    np.testing.assert_allclose(tf_preprocessing()(pixels), expected, rtol=1e-5, atol=1e-5)
