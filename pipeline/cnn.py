"""The CNN trained from scratch: it takes raw 0-255 RGB pixels at its image size and outputs
the probability of a dog, so a saved `.keras` file is all `pipeline.predict` needs."""

from __future__ import annotations

import keras

from pipeline.config import RandomAugmentConfig, TrainCnnConfig
from pipeline.optimizers import compile_binary, learning_rate_schedule, make_optimizer
from pipeline.precision import probability_of_dog


def random_augmentation(cfg: RandomAugmentConfig, seed: int) -> list[keras.layers.Layer]:
    """Keras's random image layers: active in training only, so they run where the model
    runs (on a GPU, the GPU) and a saved model predicts on the image as given.

    float32, whatever the precision policy: the geometric transforms interpolate pixels,
    which bfloat16's 8 bits of mantissa would band.
    """
    layers: list[keras.layers.Layer] = []
    if cfg.horizontal_flip:
        layers.append(keras.layers.RandomFlip("horizontal", seed=seed, dtype="float32"))
    if cfg.rotation:
        layers.append(keras.layers.RandomRotation(cfg.rotation, seed=seed + 1, dtype="float32"))
    if cfg.zoom:
        layers.append(keras.layers.RandomZoom(cfg.zoom, seed=seed + 2, dtype="float32"))
    if cfg.shift:
        layers.append(
            keras.layers.RandomTranslation(cfg.shift, cfg.shift, seed=seed + 3, dtype="float32")
        )
    return layers


def conv_unit(x, filters: int, cfg: TrainCnnConfig, strides: int = 1):
    """A 3x3 convolution, batch-normalized if asked, then ReLU; depthwise-separable if asked,
    but for the strided stem, whose 3 input channels leave a separable conv nothing to save."""
    conv = keras.layers.SeparableConv2D if cfg.separable and strides == 1 else keras.layers.Conv2D
    x = conv(filters, 3, strides=strides, padding="same", use_bias=not cfg.batch_norm)(x)
    if cfg.batch_norm:
        x = keras.layers.BatchNormalization()(x)
    return keras.layers.Activation("relu")(x)


def conv_block(x, filters: int, cfg: TrainCnnConfig):
    """`convs_per_block` conv units at one width, then 2x2 max pooling; with `residual`, the
    block's input joins its output through a strided 1x1 convolution (ResNet's shortcut)."""
    shortcut = x
    for _ in range(cfg.convs_per_block):
        x = conv_unit(x, filters, cfg)
    x = keras.layers.MaxPooling2D(2, padding="same")(x)
    if cfg.residual:
        shortcut = keras.layers.Conv2D(filters, 1, strides=2, padding="same")(shortcut)
        x = keras.layers.Add()([x, shortcut])
    return x


def build_cnn(
    cfg: TrainCnnConfig, *, steps_per_epoch: int = 1, steps_per_execution: int = 1, seed: int = 0
) -> keras.Model:
    """The scratch CNN `cfg` describes, compiled: random augmentation (training only), an
    optional stride-2 stem, conv blocks, an optional wider top conv, pooling, dense layers,
    dropout and a sigmoid.

    The tutorial's network is one setting of it (see `presets/tutorial.txt`): no stem, blocks
    of one conv at 32, 32 and 64 filters, flatten, dense 64, dropout 0.5, no batch norm.
    """
    inputs = keras.Input(shape=(*cfg.image_size, 3), name="image")
    x = inputs
    for layer in random_augmentation(cfg.random_augment, seed) if cfg.random_augment else []:
        x = layer(x)
    x = keras.layers.Rescaling(1.0 / 255)(x)
    if cfg.stem_filters:
        x = conv_unit(x, cfg.stem_filters, cfg, strides=2)
    for filters in cfg.block_filters:
        x = conv_block(x, filters, cfg)
    if cfg.top_filters:
        x = conv_unit(x, cfg.top_filters, cfg)
    if cfg.pooling == "average":
        x = keras.layers.GlobalAveragePooling2D()(x)
    else:
        x = keras.layers.Flatten()(x)
    for units in cfg.dense_units:
        x = keras.layers.Dense(units, activation="relu")(x)
        x = keras.layers.Dropout(cfg.dropout)(x)
    if not cfg.dense_units and cfg.dropout:
        x = keras.layers.Dropout(cfg.dropout)(x)
    outputs = probability_of_dog(x)
    model = keras.Model(inputs, outputs, name="cnn")
    optimizer = make_optimizer(cfg, learning_rate_schedule(cfg, steps_per_epoch))
    return compile_binary(
        model,
        cfg,
        optimizer,
        steps_per_execution=steps_per_execution,
        label_smoothing=cfg.label_smoothing,
    )
