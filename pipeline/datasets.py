"""`tf.data` input pipelines: parallel decode, resize, batch and prefetch.

Kept apart from `pipeline.images` so the stages that only sort files never import TensorFlow.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import tensorflow as tf

from pipeline.images import LabeledImage


def load_image(path, image_size: Sequence[int]):
    """A file as a float32 `(height, width, 3)` tensor of 0-255 pixels, resized for a model.

    The one decode-and-resize used for training, extraction and prediction, so a model
    sees at prediction time exactly what it saw in training.
    """
    image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
    image = tf.image.resize(image, image_size, method="bilinear", antialias=True)
    return tf.ensure_shape(image, (*image_size, 3))


def image_dataset(
    images: Iterable[LabeledImage],
    image_size: Sequence[int],
    batch_size: int,
    shuffle_seed: int | None = None,
):
    """A batched, prefetched `tf.data.Dataset` of `(images, labels)` decoded in parallel."""
    images = list(images)
    paths = [str(item.path) for item in images]
    labels = [float(item.label) for item in images]
    size = tuple(image_size)
    dataset = tf.data.Dataset.from_tensor_slices((paths, labels))
    if shuffle_seed is not None:
        dataset = dataset.shuffle(len(paths), seed=shuffle_seed, reshuffle_each_iteration=True)
    dataset = dataset.map(
        lambda path, label: (load_image(path, size), label),
        num_parallel_calls=tf.data.AUTOTUNE,
    )
    return dataset.batch(batch_size).prefetch(tf.data.AUTOTUNE)
