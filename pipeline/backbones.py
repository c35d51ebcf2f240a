"""The pretrained backbones: each one's Keras application, its own input preprocessing as a
layer, and its ImageNet weights, downloaded or read from a path."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np

from pipeline.config import FeaturesConfig
from pipeline.errors import PipelineError
from pipeline.files import project_root


class WeightsUnavailableError(PipelineError, RuntimeError):
    """The backbone's pretrained weights could not be downloaded or read."""


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
