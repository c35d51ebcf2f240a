from __future__ import annotations

import shutil
from pathlib import Path

import keras
import numpy as np
import pytest

from bench.accuracy import PRESETS, preset_overrides
from pipeline.config import Config, load_config
from pipeline.models import (
    WeightsUnavailableError,
    build_backbone,
    build_cnn,
    build_head,
    caffe_preprocessing,
    compose_transfer,
    for_inference,
    learning_rate_schedule,
    make_optimizer,
    resolve_weights,
)
from tests.conftest import REPO_ROOT, tiny_config

CNN = tiny_config().train_cnn
FEATURES = tiny_config().features
HEAD = tiny_config().head.model_copy(update={"units": 8, "learning_rate": 1e-3})


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


def test_cosine_schedule_warms_up_linearly_then_decays_to_zero() -> None:
    cfg = CNN.model_copy(
        update={"learning_rate": 0.002, "epochs": 5, "warmup_epochs": 1, "schedule": "cosine"}
    )
    schedule = learning_rate_schedule(cfg, steps_per_epoch=10)
    rate = [float(schedule(step)) for step in (0, 5, 10, 30, 50)]
    assert rate[0] == pytest.approx(0.0)
    assert rate[1] == pytest.approx(0.001)
    assert rate[2] == pytest.approx(0.002)
    assert rate[3] == pytest.approx(0.001, rel=1e-3)  # halfway down the cosine
    assert rate[4] == pytest.approx(0.0, abs=1e-9)
    constant = CNN.model_copy(update={"schedule": "constant", "learning_rate": 0.003})
    assert learning_rate_schedule(constant, steps_per_epoch=10) == 0.003


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


@pytest.mark.parametrize(
    ("name", "kind", "momentum"),
    [
        ("adam", keras.optimizers.Adam, None),
        ("sgd", keras.optimizers.SGD, 0.9),
        ("rmsprop", keras.optimizers.RMSprop, 0.9),
    ],
)
def test_optimizer_is_the_configured_one_with_its_learning_rate(name, kind, momentum) -> None:
    cfg = HEAD.model_copy(update={"optimizer": name, "learning_rate": 0.05, "momentum": 0.9})
    optimizer = make_optimizer(cfg)
    assert type(optimizer) is kind
    assert float(optimizer.learning_rate) == pytest.approx(0.05)
    if momentum is not None:
        assert optimizer.momentum == pytest.approx(momentum)


def test_caffe_preprocessing_matches_keras_vgg16_preprocess_input() -> None:
    pixels = np.random.default_rng(0).uniform(0, 255, (2, 5, 5, 3)).astype("float32")
    expected = keras.applications.vgg16.preprocess_input(pixels.copy())
    np.testing.assert_allclose(caffe_preprocessing()(pixels), expected, rtol=1e-5, atol=1e-3)


def test_backbone_with_random_weights_and_transfer_model_round_trip(tmp_path: Path) -> None:
    backbone = build_backbone(FEATURES)
    assert backbone.output_shape == (None, 512)  # 32x32 in, 1x1x512 out
    assert not any(layer.trainable_weights for layer in backbone.layers)
    head = build_head(512, HEAD)
    transfer = compose_transfer(backbone, head)
    images = np.random.default_rng(1).uniform(0, 255, (3, 32, 32, 3)).astype("float32")
    direct = head.predict(backbone.predict(images, verbose=0), verbose=0)
    np.testing.assert_allclose(transfer.predict(images, verbose=0), direct, rtol=1e-5)
    for_inference(transfer).save(tmp_path / "transfer.keras")  # as train_head saves it
    reloaded = keras.models.load_model(tmp_path / "transfer.keras")  # safe mode: no Lambda
    np.testing.assert_allclose(reloaded.predict(images, verbose=0), direct, rtol=1e-5)


def test_saved_models_leave_the_optimizer_state_behind(tmp_path: Path) -> None:
    backbone = build_backbone(FEATURES)
    head = build_head(512, HEAD.model_copy(update={"units": 256}))  # weights >> file overhead
    features = np.random.default_rng(2).normal(size=(16, 512)).astype("float32")
    head.fit(features, (features[:, 0] > 0).astype("float32"), epochs=1, verbose=0)
    assert head.optimizer.variables  # Adam's two slots per weight, built by training
    copy = for_inference(head)
    assert not copy.compiled
    np.testing.assert_array_equal(
        copy.predict(features, verbose=0), head.predict(features, verbose=0)
    )

    head.save(tmp_path / "compiled.keras")
    copy.save(tmp_path / "copy.keras")
    weights = sum(int(np.prod(w.shape)) for w in head.weights) * 4
    assert (tmp_path / "compiled.keras").stat().st_size > 2.5 * weights
    assert (tmp_path / "copy.keras").stat().st_size < 1.5 * weights

    transfer = for_inference(compose_transfer(backbone, head))
    frozen = [layer.trainable for layer in transfer.layers[1].layers]
    assert frozen == [layer.trainable for layer in backbone.layers]  # still frozen
    transfer.save(tmp_path / "transfer.keras")
    reloaded = keras.models.load_model(tmp_path / "transfer.keras")
    images = np.random.default_rng(3).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    expected = head.predict(backbone.predict(images, verbose=0), verbose=0)
    np.testing.assert_allclose(reloaded.predict(images, verbose=0), expected, rtol=1e-5)


def test_a_model_trained_under_mixed_precision_is_saved_in_float32(tmp_path: Path) -> None:
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:  # under the training policy, as the stages call it
        cnn = build_cnn(CNN)
        for_inference(cnn).save(tmp_path / "cnn.keras")
    finally:
        keras.mixed_precision.set_global_policy("float32")
    rescaling = next(i for i, x in enumerate(cnn.layers) if isinstance(x, keras.layers.Rescaling))
    convolutional = cnn.layers[rescaling + 1 : -1]
    assert {layer.compute_dtype for layer in convolutional} == {"bfloat16"}
    reloaded = keras.models.load_model(tmp_path / "cnn.keras")
    assert {layer.compute_dtype for layer in reloaded.layers} == {"float32"}
    # One input and one output tensor, as built: explain's Grad-CAM model taps them.
    assert not isinstance(reloaded.input, list) and not isinstance(reloaded.output, list)
    images = np.random.default_rng(4).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(
        reloaded.predict(images, verbose=0), cnn.predict(images, verbose=0), atol=0.02
    )


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
    from pipeline.models import tf_preprocessing

    pixels = np.random.default_rng(0).uniform(0, 255, (2, 4, 4, 3)).astype("float32")
    expected = keras.applications.mobilenet_v2.preprocess_input(pixels.copy())
    np.testing.assert_allclose(tf_preprocessing()(pixels), expected, rtol=1e-5, atol=1e-5)
