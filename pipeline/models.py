"""Model builders: the scratch CNN, the pretrained backbones, the dense head, and their composition.

Every model here takes raw 0-255 RGB pixels at its image size and outputs the probability
of a dog, so a saved `.keras` file is all `pipeline.predict` needs.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np

from pipeline.config import (
    FeaturesConfig,
    FinetuneConfig,
    HeadConfig,
    OptimizerMixin,
    RandomAugmentConfig,
    TrainCnnConfig,
)
from pipeline.errors import PipelineError
from pipeline.files import project_root


class WeightsUnavailableError(PipelineError, RuntimeError):
    """The backbone's pretrained weights could not be downloaded or read."""


def make_optimizer(
    cfg: OptimizerMixin, learning_rate: float | keras.optimizers.schedules.LearningRateSchedule = 0
) -> keras.optimizers.Optimizer:
    """The optimizer `cfg` names, at `learning_rate` (a schedule) or else `cfg.learning_rate`."""
    rate = learning_rate or cfg.learning_rate
    if cfg.optimizer == "sgd":
        return keras.optimizers.SGD(learning_rate=rate, momentum=cfg.momentum)
    if cfg.optimizer == "rmsprop":
        return keras.optimizers.RMSprop(learning_rate=rate, momentum=cfg.momentum)
    if cfg.optimizer == "adamw":
        optimizer = keras.optimizers.AdamW(learning_rate=rate, weight_decay=cfg.weight_decay)
        # Decay shrinks weights toward zero; biases and batch-norm scales and offsets have no
        # such prior, so they are left alone, as in the AdamW paper's experiments.
        optimizer.exclude_from_weight_decay(var_names=["bias", "gamma", "beta"])
        return optimizer
    return keras.optimizers.Adam(learning_rate=rate)


def compile_binary(
    model: keras.Model,
    cfg: OptimizerMixin,
    optimizer: keras.optimizers.Optimizer | None = None,
    jit_compile: bool | str = "auto",
    steps_per_execution: int = 1,
    label_smoothing: float = 0.0,
) -> keras.Model:
    """Compiles `model` as every stage trains it; `optimizer` and `jit_compile` let the
    benchmarks measure alternatives to `make_optimizer(cfg)` and Keras's default.

    `steps_per_execution` batches run inside one compiled call: the same updates in the same
    order (`compute.steps_per_execution` in params.yaml), with one Python round trip each.
    """
    model.compile(
        optimizer=optimizer or make_optimizer(cfg),
        loss=keras.losses.BinaryCrossentropy(label_smoothing=label_smoothing),
        metrics=["accuracy", keras.metrics.AUC(name="auc")],
        jit_compile=jit_compile,
        steps_per_execution=steps_per_execution,
    )
    return model


OUTPUT_LAYER = "prob_dog"


def probability_of_dog(x):
    """The sigmoid output, float32 even under a mixed-precision policy, as Keras advises for
    the last layer: float16 keeps ~3 significant digits, too few for confident probabilities.
    """
    return keras.layers.Dense(1, activation="sigmoid", dtype="float32", name=OUTPUT_LAYER)(x)


def learning_rate_schedule(
    cfg: TrainCnnConfig, steps_per_epoch: int
) -> float | keras.optimizers.schedules.LearningRateSchedule:
    """`cfg.learning_rate`, constant or reached after `warmup_epochs` of linear warm-up and
    then decayed to zero along a cosine by the last epoch (Keras's `CosineDecay`)."""
    if cfg.schedule == "constant":
        return cfg.learning_rate
    warmup_steps = cfg.warmup_epochs * steps_per_epoch
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0 if warmup_steps else cfg.learning_rate,
        decay_steps=(cfg.epochs - cfg.warmup_epochs) * steps_per_epoch,
        warmup_target=cfg.learning_rate if warmup_steps else None,
        warmup_steps=warmup_steps,
    )


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


def resolve_weights(weights: str) -> str | None:
    """The `weights` argument for `keras.applications` from the `features.weights` param."""
    if weights == "none":
        return None
    if weights == "imagenet":
        return "imagenet"
    path = Path(weights).expanduser()
    # Relative to the user's repository, also when DVC runs the stage in a temporary copy
    # (a queued experiment), where an untracked weights file is not copied; as download's
    # local_path.
    path = path if path.is_absolute() else project_root() / path
    if not path.is_file():
        raise WeightsUnavailableError(f"features.weights points to {path}, which does not exist.")
    return str(path)


# VGG16's and ResNet50's `preprocess_input` ("caffe" mode): RGB to BGR, minus the ImageNet
# mean in BGR order.
IMAGENET_MEAN_BGR = (103.939, 116.779, 123.68)


def caffe_preprocessing() -> keras.layers.Layer:
    """`keras.applications.vgg16.preprocess_input` as a frozen Dense layer on the channel axis.

    A built-in layer, not a Lambda, so saved models load with Keras' safe mode and in MLflow
    without shipping this module.
    """
    flip_channels = np.eye(3, dtype="float32")[::-1]
    layer = keras.layers.Dense(3, trainable=False, name="caffe_preprocess")
    layer.build((None, 3))
    layer.set_weights([flip_channels, -np.asarray(IMAGENET_MEAN_BGR, dtype="float32")])
    return layer


def tf_preprocessing() -> keras.layers.Layer:
    """`preprocess_input` of MobileNetV2 and Xception ("tf" mode): pixels scaled to [-1, 1]."""
    return keras.layers.Rescaling(1 / 127.5, offset=-1.0, name="tf_preprocess")


@dataclass(frozen=True)
class BackboneSpec:
    build: Callable[..., keras.Model]
    preprocessing: Callable[[], keras.layers.Layer] | None  # None: the model rescales itself
    weights_file: str  # what Keras downloads for weights="imagenet"
    # EfficientNet adds its ImageNet input scaling only for weights="imagenet": loaded from a
    # path, the same weights would see differently scaled pixels.
    takes_weights_path: bool = True


BACKBONES: dict[str, BackboneSpec] = {
    "vgg16": BackboneSpec(
        keras.applications.VGG16,
        caffe_preprocessing,
        "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5",
    ),
    "resnet50": BackboneSpec(
        keras.applications.ResNet50,
        caffe_preprocessing,
        "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
    ),
    "mobilenet_v2": BackboneSpec(
        keras.applications.MobileNetV2,
        tf_preprocessing,
        "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5",
    ),
    "efficientnet_b0": BackboneSpec(
        keras.applications.EfficientNetB0,
        None,
        "efficientnetb0_notop.h5",
        takes_weights_path=False,
    ),
    "xception": BackboneSpec(
        keras.applications.Xception,
        tf_preprocessing,
        "xception_weights_tf_dim_ordering_tf_kernels_notop.h5",
    ),
}


@contextlib.contextmanager
def download_bar_on_a_terminal_only() -> Iterator[None]:
    """Keras draws the weights' download progress with ANSI colour codes, a new line for each
    update when stdout is not a terminal; in a log, it is left out (Keras's interactive
    logging off: it then goes to absl's INFO log, hidden)."""
    if sys.stdout.isatty() or not keras.config.is_interactive_logging_enabled():
        yield
        return
    keras.config.disable_interactive_logging()
    try:
        yield
    finally:
        keras.config.enable_interactive_logging()


def build_backbone(cfg: FeaturesConfig) -> keras.Model:
    """The backbone's convolutional base with its own `preprocess_input`, taking 0-255 RGB."""
    spec = BACKBONES[cfg.backbone]
    weights = resolve_weights(cfg.weights)
    if weights not in (None, "imagenet") and not spec.takes_weights_path:
        raise WeightsUnavailableError(
            f"{cfg.backbone} loads ImageNet weights only through features.weights: imagenet "
            "(Keras adds its input scaling only then). Copy the file to "
            f"~/.keras/models/{spec.weights_file}, where Keras looks before downloading, "
            "and set features.weights: imagenet."
        )
    try:
        with download_bar_on_a_terminal_only():
            base = spec.build(include_top=False, weights=weights, input_shape=(*cfg.image_size, 3))
    except Exception as error:  # Keras raises several types for a failed fetch or a bad file
        raise WeightsUnavailableError(weights_help(cfg, error)) from error
    base.trainable = False
    inputs = keras.Input(shape=(*cfg.image_size, 3), name="image")
    x = spec.preprocessing()(inputs) if spec.preprocessing else inputs
    x = base(x, training=False)
    if cfg.pooling == "avg":
        x = keras.layers.GlobalAveragePooling2D()(x)
    else:
        x = keras.layers.Flatten()(x)
    return keras.Model(inputs, x, name=f"{cfg.backbone}_features")


def weights_help(cfg: FeaturesConfig, error: Exception) -> str:
    name, spec = cfg.backbone, BACKBONES[cfg.backbone]
    if cfg.weights == "imagenet":
        use_it = (
            "set\n    features.weights to its path "
            "(dvc exp run -S features.weights=/path/to/file.h5)"
            if spec.takes_weights_path
            else "copy it\n    to ~/.keras/models/, where Keras looks before downloading"
        )
        return (
            f"Could not download the {name} ImageNet weights ({type(error).__name__}: {error}).\n"
            "Fixes:\n"
            "  - connect to the internet once: Keras caches the file in ~/.keras/models/;\n"
            f"  - or download {spec.weights_file} elsewhere and {use_it};\n"
            "  - or, for a smoke run that needs no download, set features.weights to none\n"
            "    (random weights: the pipeline runs, but the transfer model learns little)."
        )
    return f"Could not load {name} weights from {cfg.weights}: {type(error).__name__}: {error}"


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


def in_current_precision(saved: keras.Model) -> keras.Model:
    """A copy of `saved`, same layers and weights, computing in this process's dtype policy.

    A loaded `.keras` file keeps the dtype policy its layers were saved under, whatever this
    process's policy is. The copy is cloned from the saved structure, not rebuilt from
    params: EfficientNet's base, for one, holds a scaling layer only when built with
    `weights="imagenet"`. The output layer stays float32, as the builders make it.
    """
    return copy_under_policy(saved, keras.mixed_precision.global_policy())


def for_inference(trained: keras.Model) -> keras.Model:
    """An uncompiled float32 copy of `trained`: what the stages save and log.

    Float32 because a saved model runs under the policy it was saved with, wherever it is
    loaded: one trained under mixed precision (a GPU, or a CPU with native bfloat16) would
    crawl through emulated float16 or bfloat16 on a laptop without them. Its weights are
    float32 either way. Uncompiled because a compiled model's file also holds the
    optimizer's state, two more values per weight for Adam (the head's file: 25 MB instead
    of 8.4), and no stage resumes training from a saved model: finetune compiles its own.
    """
    # A new model over the same layers is uncompiled; `clone_model` compiles its copy like
    # the original. `input`/`output`, not the lists: single-tensor models stay single-tensor.
    uncompiled = keras.Model(trained.input, trained.output, name=trained.name)
    return copy_under_policy(uncompiled, "float32")


def copy_under_policy(model: keras.Model, policy: str | keras.DTypePolicy) -> keras.Model:
    """`model`'s layers and weights, computing under `policy` but for the float32 output."""

    def with_policy(layer: keras.layers.Layer) -> keras.layers.Layer:
        config = layer.get_config()
        if "dtype" in config and not isinstance(layer, keras.layers.InputLayer):
            config["dtype"] = "float32" if layer.name == OUTPUT_LAYER else policy
        return layer.__class__.from_config(config)

    copy = keras.models.clone_model(model, clone_function=with_policy, recursive=True)
    copy.set_weights(model.get_weights())
    match_trainable(model, copy)
    return copy


def match_trainable(source: keras.layers.Layer, copy: keras.layers.Layer) -> None:
    """Copies which layers are frozen: cloning leaves nested models (a backbone) trainable."""
    copy.trainable = source.trainable  # first: setting a model's flag sets its layers' too
    if isinstance(source, keras.Model):
        for source_layer, copy_layer in zip(source.layers, copy.layers, strict=True):
            match_trainable(source_layer, copy_layer)


def build_finetune_model(
    backbone: keras.Model, head: keras.Model, cfg: FinetuneConfig, steps_per_execution: int = 1
) -> tuple[keras.Model, list[str]]:
    """Backbone and trained head as one model, the top of the backbone unfrozen, compiled."""
    unfrozen = unfreeze_top(backbone, cfg.unfreeze_layers)
    model = compose_transfer(backbone, head)
    return compile_binary(model, cfg, steps_per_execution=steps_per_execution), unfrozen
