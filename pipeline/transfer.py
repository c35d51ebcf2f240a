"""The dense head trained on a backbone's features, and the backbone and head composed into
one model that takes raw 0-255 RGB pixels (for `pipeline.predict`, and to fine-tune)."""

from __future__ import annotations

import keras

from pipeline.config import FinetuneConfig, HeadConfig
from pipeline.optimizers import compile_binary
from pipeline.precision import probability_of_dog


def build_head(feature_dim: int, cfg: HeadConfig, steps_per_execution: int = 1) -> keras.Model:
    """The small dense classifier trained on bottleneck features."""
    inputs = keras.Input(shape=(feature_dim,), name="features")
    x = keras.layers.Dense(cfg.units, activation="relu")(inputs)
    x = keras.layers.Dropout(cfg.dropout)(x)
    outputs = probability_of_dog(x)
    model = keras.Model(inputs, outputs, name="head")
    return compile_binary(model, cfg, steps_per_execution=steps_per_execution)


def compose_transfer(backbone: keras.Model, head: keras.Model) -> keras.Model:
    """Backbone and head as one model that takes raw images, for `pipeline.predict`."""
    inputs = keras.Input(shape=backbone.input_shape[1:], name="image")
    outputs = head(backbone(inputs))
    return keras.Model(inputs, outputs, name="transfer")


def unfreeze_top(backbone: keras.Model, layers: int) -> list[str]:
    """Makes the last `layers` weighted layers of the backbone's base trainable.

    BatchNormalization layers stay frozen, as Keras advises for fine-tuning: the backbone's
    graph calls its base with `training=False`, so they also keep their ImageNet statistics.
    """
    base = next(layer for layer in backbone.layers if isinstance(layer, keras.Model))
    base.trainable = True
    weighted = [layer for layer in base.layers if layer.weights]
    unfrozen = set(weighted[-layers:]) if layers else set()
    for layer in base.layers:
        frozen = layer not in unfrozen or isinstance(layer, keras.layers.BatchNormalization)
        layer.trainable = not frozen
    return [layer.name for layer in weighted[-layers:] if layer.trainable]


def build_finetune_model(
    backbone: keras.Model, head: keras.Model, cfg: FinetuneConfig, steps_per_execution: int = 1
) -> tuple[keras.Model, list[str]]:
    """Backbone and trained head as one model, the top of the backbone unfrozen, compiled."""
    unfrozen = unfreeze_top(backbone, cfg.unfreeze_layers)
    model = compose_transfer(backbone, head)
    return compile_binary(model, cfg, steps_per_execution=steps_per_execution), unfrozen
