from __future__ import annotations

import shutil
from pathlib import Path

import keras
import numpy as np
import pytest

from bench.accuracy import PRESETS, preset_overrides
from pipeline.cnn import build_cnn
from pipeline.config import Config, load_config
from tests.conftest import REPO_ROOT, tiny_config

CNN = tiny_config().train_cnn


def preset_config(tmp_path: Path, name: str) -> Config:
    """params.yaml with a preset applied exactly as `dvc exp run -S` applies it."""
    from dvc.utils.hydra import apply_overrides

    params = tmp_path / "params.yaml"
    shutil.copy(REPO_ROOT / "params.yaml", params)
    apply_overrides(params, preset_overrides(name))
    return load_config(params)


def layer_kinds(model: keras.Model) -> list[str]:
    return [type(layer).__name__ for layer in model.layers]


def test_tutorial_preset_builds_exactly_the_tutorials_network_and_optimizer(tmp_path) -> None:
    cfg = preset_config(tmp_path, "tutorial").train_cnn
    model = build_cnn(cfg)
    assert layer_kinds(model) == [
        "InputLayer",
        "RandomFlip",
        "RandomZoom",
        "Rescaling",
        *["Conv2D", "Activation", "MaxPooling2D"] * 3,
        "Flatten",
        "Dense",
        "Dropout",
        "Dense",
    ]
    convs = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    assert [(c.filters, c.kernel_size, c.strides) for c in convs] == [
        (32, (3, 3), (1, 1)),
        (32, (3, 3), (1, 1)),
        (64, (3, 3), (1, 1)),
    ]
    pools = [layer for layer in model.layers if isinstance(layer, keras.layers.MaxPooling2D)]
    assert all(pool.pool_size == (2, 2) for pool in pools)
    hidden, dropout = model.layers[-3], model.layers[-2]
    assert hidden.units == 64 and hidden.activation is keras.activations.relu
    assert dropout.rate == 0.5
    assert model.layers[-1].activation is keras.activations.sigmoid
    assert model.input_shape == (None, 150, 150, 3)
    optimizer = model.optimizer
    assert type(optimizer) is keras.optimizers.SGD
    assert float(optimizer.learning_rate) == pytest.approx(0.01)
    assert optimizer.momentum == pytest.approx(0.9)
    assert model.loss.get_config()["label_smoothing"] == 0


@pytest.mark.parametrize("name", sorted(path.stem for path in PRESETS.glob("*.txt")))
def test_every_preset_is_valid_params(tmp_path, name) -> None:
    cfg = preset_config(tmp_path, name).train_cnn
    assert build_cnn(cfg).count_params() > 0


def test_default_cnn_is_stem_double_conv_blocks_top_conv_and_average_pooling(repo_config) -> None:
    cfg = repo_config.train_cnn
    model = build_cnn(cfg, steps_per_epoch=10)
    convs = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    stem, *blocks, top = convs
    assert stem.strides == (2, 2) and stem.filters == cfg.stem_filters
    assert [c.filters for c in blocks] == [f for f in cfg.block_filters for _ in range(2)]
    assert top.filters == cfg.top_filters
    norms = sum(isinstance(layer, keras.layers.BatchNormalization) for layer in model.layers)
    assert norms == len(convs)
    assert isinstance(model.layers[-3], keras.layers.GlobalAveragePooling2D)
    assert model.layers[-2].rate == cfg.dropout
    assert type(model.optimizer) is keras.optimizers.AdamW
    assert model.optimizer.weight_decay == pytest.approx(cfg.weight_decay)
    random_layers = [layer for layer in model.layers if layer.name.startswith("random_")]
    assert [type(layer).__name__ for layer in random_layers] == [
        "RandomFlip",
        "RandomRotation",
        "RandomZoom",
        "RandomTranslation",
    ]
    assert all(layer.compute_dtype == "float32" for layer in random_layers)


def test_residual_blocks_add_a_strided_shortcut_and_separable_blocks_use_depthwise_convs() -> None:
    cfg = CNN.model_copy(update={"residual": True, "separable": True})
    model = build_cnn(cfg)
    adds = [layer for layer in model.layers if isinstance(layer, keras.layers.Add)]
    assert len(adds) == len(cfg.block_filters)
    shortcuts = [
        layer
        for layer in model.layers
        if isinstance(layer, keras.layers.Conv2D) and layer.kernel_size == (1, 1)
    ]
    assert [(s.filters, s.strides) for s in shortcuts] == [(f, (2, 2)) for f in cfg.block_filters]
    separable = [x for x in model.layers if isinstance(x, keras.layers.SeparableConv2D)]
    assert len(separable) == len(cfg.block_filters) * cfg.convs_per_block + 1  # and the top
    assert model.predict(np.zeros((1, 32, 32, 3)), verbose=0).shape == (1, 1)


def test_label_smoothing_reaches_the_loss() -> None:
    model = build_cnn(CNN.model_copy(update={"label_smoothing": 0.1}))
    assert model.loss.get_config()["label_smoothing"] == pytest.approx(0.1)


def test_random_augmentation_acts_in_training_only() -> None:
    keras.utils.set_random_seed(0)
    model = build_cnn(CNN)
    images = np.random.default_rng(0).uniform(0, 255, (4, 32, 32, 3)).astype("float32")
    inference = [keras.ops.convert_to_numpy(model(images, training=False)) for _ in range(2)]
    np.testing.assert_array_equal(inference[0], inference[1])
    augment = keras.Sequential([layer for layer in model.layers[1:5]])
    views = [keras.ops.convert_to_numpy(augment(images, training=True)) for _ in range(2)]
    assert not np.allclose(views[0], views[1])
    unchanged = keras.ops.convert_to_numpy(augment(images, training=False))
    np.testing.assert_array_equal(unchanged, images)


def test_a_seeded_training_run_repeats_exactly() -> None:
    rng = np.random.default_rng(1)
    images = rng.uniform(0, 255, (16, 32, 32, 3)).astype("float32")
    labels = rng.integers(0, 2, 16).astype("float32")

    def train() -> list[np.ndarray]:
        keras.utils.set_random_seed(7)
        model = build_cnn(CNN, steps_per_epoch=2, seed=7)
        model.fit(images, labels, batch_size=8, epochs=2, shuffle=False, verbose=0)
        return model.get_weights()

    for first, second in zip(train(), train(), strict=True):
        np.testing.assert_array_equal(first, second)
