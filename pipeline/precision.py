"""The float32 output layer, and copies of a model under another dtype policy: to train
under this process's policy, to save in float32 for any machine."""

from __future__ import annotations

import keras

OUTPUT_LAYER = "prob_dog"


def probability_of_dog(x):
    """The sigmoid output, float32 even under a mixed-precision policy, as Keras advises for
    the last layer: float16 keeps ~3 significant digits, too few for confident probabilities.
    """
    return keras.layers.Dense(1, activation="sigmoid", dtype="float32", name=OUTPUT_LAYER)(x)


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
    optimizer's state, two more values per weight for Adam (three times the weights'
    size in all), and no stage resumes training from a saved model: finetune compiles its own.
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
