from __future__ import annotations

import json
from pathlib import Path

import keras
import numpy as np
import pytest

from pipeline.backbones import build_backbone
from pipeline.precision import in_current_precision
from pipeline.transfer import build_finetune_model, build_head, unfreeze_top
from tests.conftest import dtype_policies, run_stage_without_tensorflow, set_params, tiny_config

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
    assert any(path.startswith("head") or "dense" in path for path in changed), changed
    assert all(path.startswith("block5_conv") or not path.startswith("block") for path in changed)
    assert isinstance(model.optimizer, keras.optimizers.SGD)


def test_a_disabled_stage_hands_on_the_transfer_model_without_importing_tensorflow(
    stage_workspace: Path,
) -> None:
    set_params(stage_workspace, "finetune", enabled=False)
    transfer = stage_workspace / "models" / "transfer.keras"
    transfer.parent.mkdir()
    transfer.write_bytes(b"stands for a saved Keras model")
    assert "finetune: disabled" in run_stage_without_tensorflow("finetune", stage_workspace)
    finetuned = stage_workspace / "models" / "finetuned.keras"
    assert finetuned.read_bytes() == transfer.read_bytes()
    reports = stage_workspace / "reports" / "finetune"
    # No model of its own: no metrics and no MLflow ids, so no columns in `dvc exp show`.
    assert json.loads((reports / "metrics.json").read_text()) == {}
    assert json.loads((reports / "mlflow.json").read_text()) == {}
    assert (reports / "history.csv").read_text().splitlines() == ["epoch"]
    assert (reports / "history.png").stat().st_size > 0


def saved_under(policy: str, model: keras.Model, path: Path) -> keras.Model:
    """`model` as saved by a stage that ran under `policy`, loaded back in float32."""
    keras.mixed_precision.set_global_policy(policy)
    try:
        model().save(path)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    return keras.models.load_model(path, compile=False)


@pytest.mark.parametrize("backbone", ["vgg16", "mobilenet_v2"])
def test_a_copy_computes_in_this_machines_precision_with_the_same_weights(tmp_path, backbone):
    cfg = FEATURES.model_copy(update={"backbone": backbone})
    saved = saved_under("mixed_bfloat16", lambda: build_backbone(cfg), tmp_path / "b.keras")
    assert "mixed_bfloat16" in dtype_policies(saved)  # loading keeps the saved precision
    copy = in_current_precision(saved)
    assert dtype_policies(copy) == {"float32"}
    assert len(copy.layers) == len(saved.layers)
    for ours, theirs in zip(copy.get_weights(), saved.get_weights(), strict=True):
        np.testing.assert_array_equal(ours, theirs)
    images = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(copy(images), saved(images), rtol=0.05, atol=0.05)


def test_the_copy_of_a_head_keeps_its_output_in_float32_under_mixed_precision(tmp_path):
    saved = saved_under("float32", lambda: build_head(8, HEAD), tmp_path / "head.keras")
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        copy = in_current_precision(saved)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    policies = {layer.name: layer.dtype_policy.name for layer in copy.layers}
    assert policies.pop("prob_dog") == "float32"
    assert set(policies.values()) == {"mixed_bfloat16"}


def test_batch_norm_of_a_copied_backbone_stays_frozen_in_finetuning(tmp_path) -> None:
    cfg = FEATURES.model_copy(update={"backbone": "mobilenet_v2", "pooling": "avg"})
    saved = saved_under("float32", lambda: build_backbone(cfg), tmp_path / "b.keras")
    model, _ = build_finetune_model(in_current_precision(saved), build_head(1280, HEAD), FINETUNE)
    norms = [w for w in model.non_trainable_weights if "moving_mean" in w.path]
    before = [np.array(w) for w in norms]
    images = np.random.default_rng(0).uniform(0, 255, (4, 32, 32, 3)).astype("float32")
    model.train_on_batch(images, np.array([0, 1, 0, 1], "float32"))
    assert norms and all(np.array_equal(np.array(w), b) for w, b in zip(norms, before, strict=True))
