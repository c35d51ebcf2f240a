from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pytest

from devtools.fakes import jpeg_bytes, photo
from pipeline.cnn import build_cnn
from pipeline.explain import (
    feature_maps,
    first_layer_filters,
    grad_cam,
    pick_examples,
    write_figures,
)
from pipeline.images import LabeledImage
from tests.conftest import tiny_config

CFG = tiny_config().train_cnn.model_copy(
    update={
        "stem_filters": 0,
        "block_filters": [4, 6],
        "top_filters": 0,
        "dense_units": [8],
        "dropout": 0.0,
        "batch_norm": True,
    }
)


@pytest.fixture(scope="module")
def model() -> keras.Model:
    keras.utils.set_random_seed(0)
    return build_cnn(CFG)


def test_filters_feature_maps_and_grad_cam_shapes(model) -> None:
    filters = first_layer_filters(model)
    assert filters.shape == (4, 3, 3, 3) and filters.min() >= 0 and filters.max() <= 1
    images = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    maps = feature_maps(model, images)
    assert [m.shape for m in maps] == [(2, 32, 32, 4), (2, 16, 16, 6)]
    assert all(m.min() >= 0 for m in maps)  # after the ReLU, not before
    heat = grad_cam(model, images)
    assert heat.shape == (2, 32, 32) and heat.min() >= 0 and heat.max() <= 1


def test_grad_cam_points_at_the_evidence() -> None:
    """A hand-built model whose decision uses red only: the heat must sit on the red square."""
    inputs = keras.Input((16, 16, 3))
    conv = keras.layers.Conv2D(2, 1, use_bias=False)
    act = keras.layers.Activation("relu")(conv(inputs))
    pooled = keras.layers.GlobalAveragePooling2D()(act)
    dense = keras.layers.Dense(1, activation="sigmoid")
    model = keras.Model(inputs, dense(pooled))
    reads = np.zeros((1, 1, 3, 2), "float32")
    reads[0, 0, 0, 0] = 1.0  # channel 0 sees red
    reads[0, 0, 2, 1] = 1.0  # channel 1 sees blue
    conv.set_weights([reads])
    dense.set_weights([np.array([[1.0], [0.0]], "float32"), np.zeros(1, "float32")])
    image = np.zeros((1, 16, 16, 3), "float32")
    image[0, 4:12, 1:7, 0] = 1.0  # red square on the left
    image[0, 4:12, 9:15, 2] = 1.0  # blue square on the right
    heat = grad_cam(model, image)[0]
    assert heat[4:12, 1:7].mean() > 0.9 and heat[:, 9:].max() < 1e-6


def test_examples_are_balanced_and_figures_written(tmp_path: Path, model) -> None:
    test = []
    for label in (0, 1):
        for n in range(5):
            path = tmp_path / f"{label}-{n}.jpg"
            path.write_bytes(jpeg_bytes(photo(label, n)))
            test.append(LabeledImage(path, label))
    examples = pick_examples(test, 4)
    assert [e.label for e in examples] == [0, 0, 1, 1]
    out = tmp_path / "figures"
    out.mkdir()
    write_figures(model, examples, out)
    assert sorted(p.name for p in out.iterdir()) == [
        "feature_maps_1.png",
        "feature_maps_2.png",
        "feature_maps_3.png",
        "feature_maps_4.png",
        "filters.png",
        "grad_cam.png",
    ]
