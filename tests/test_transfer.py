from __future__ import annotations

from pathlib import Path

import keras
import numpy as np

from pipeline.backbones import build_backbone
from pipeline.precision import for_inference
from pipeline.transfer import build_head, compose_transfer
from tests.conftest import tiny_config

FEATURES = tiny_config().features
HEAD = tiny_config().head.model_copy(update={"units": 8, "learning_rate": 1e-3})


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
