from __future__ import annotations

from pathlib import Path

import keras
import numpy as np

from pipeline.backbones import build_backbone
from pipeline.cnn import build_cnn
from pipeline.precision import for_inference
from pipeline.transfer import build_head, compose_transfer
from tests.conftest import tiny_config

CNN = tiny_config().train_cnn
FEATURES = tiny_config().features
HEAD = tiny_config().head.model_copy(update={"units": 8, "learning_rate": 1e-3})


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
