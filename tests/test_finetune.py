from __future__ import annotations

import keras
import numpy as np

from pipeline.finetune import build_finetune_model, unfreeze_top
from pipeline.models import build_backbone, build_head
from tests.conftest import tiny_config

FEATURES = tiny_config().features
HEAD = tiny_config().head.model_copy(update={"units": 4})
FINETUNE = tiny_config().finetune.model_copy(update={"use_augmented": False, "batch_size": 4})


def test_only_the_top_block_becomes_trainable() -> None:
    backbone = build_backbone(FEATURES)
    unfrozen = unfreeze_top(backbone, 3)
    assert unfrozen == ["block5_conv1", "block5_conv2", "block5_conv3"]
    trainable = {w.path.split("/")[0] for w in backbone.trainable_weights}
    assert trainable == {"block5_conv1", "block5_conv2", "block5_conv3"}


def test_batch_norm_stays_frozen_in_backbones_that_have_it() -> None:
    backbone = build_backbone(
        FEATURES.model_copy(update={"backbone": "mobilenet_v2", "pooling": "avg"})
    )
    unfreeze_top(backbone, 10)
    base = next(layer for layer in backbone.layers if isinstance(layer, keras.Model))
    norms = [layer for layer in base.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert norms and not any(layer.trainable for layer in norms)


def test_finetuning_changes_the_top_block_and_the_head_only() -> None:
    keras.utils.set_random_seed(0)
    backbone = build_backbone(FEATURES)
    head = build_head(512, HEAD)
    model, _ = build_finetune_model(backbone, head, FINETUNE)
    before = {w.path: np.array(w) for w in model.weights}
    images = np.random.default_rng(0).uniform(0, 255, (8, 32, 32, 3)).astype("float32")
    model.fit(images, np.array([0, 1] * 4, "float32"), batch_size=4, epochs=1, verbose=0)
    changed = {w.path for w in model.weights if not np.array_equal(before[w.path], np.array(w))}
    assert any(path.startswith("block5_conv") for path in changed)
    assert not any(path.startswith(("block1", "block4")) for path in changed)
    assert isinstance(model.optimizer, keras.optimizers.SGD)
