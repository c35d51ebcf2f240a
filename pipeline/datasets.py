"""`tf.data` input pipelines: parallel decode, resize, batch and prefetch.

Kept apart from `pipeline.images` so the stages that only sort files never import TensorFlow.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from pipeline.files import scratch_dir
from pipeline.images import LabeledImage


def load_image(path, image_size: Sequence[int]):
    """A file as a float32 `(height, width, 3)` tensor of 0-255 pixels, resized for a model."""
    return decode_image(tf.io.read_file(path), image_size)


def decode_image(data, image_size: Sequence[int]):
    """Encoded image bytes as a float32 `(height, width, 3)` tensor of 0-255 pixels, resized.

    The one decode-and-resize used for training, extraction, prediction and serving, so a
    model sees at prediction time exactly what it saw in training.
    """
    image = tf.io.decode_image(data, channels=3, expand_animations=False)
    # Antialiasing changes nothing when enlarging (within 1e-4) and costs several times the
    # plain bilinear resize, so it is applied only where some side shrinks.
    shrinks = tf.reduce_any(tf.shape(image)[:2] > tf.constant(image_size, tf.int32))
    image = tf.cond(
        shrinks,
        lambda: tf.image.resize(image, image_size, method="bilinear", antialias=True),
        lambda: tf.image.resize(image, image_size, method="bilinear"),
    )
    return tf.ensure_shape(image, (*image_size, 3))


# Images held in memory for reshuffling a cached dataset: ~67 MB at 150x150, whatever N is.
CACHED_SHUFFLE_BUFFER = 1000


def left_out_of_last_batch(count: int, batch_size: int, replicas: int) -> int:
    """Examples to leave out of the last batch so that no replica's share of it is empty.

    `MirroredStrategy` splits a batch by giving ceil(n / replicas) examples to each replica
    in turn, so a short last batch can leave the later ones with none (5 over 4 replicas:
    2, 2, 1, 0), which aborts the step. Leaving out n % replicas makes the batch split
    evenly: at most replicas - 1 examples an epoch, the same shuffled-away ones while a
    cache holds the order. Extraction pads with replicas minus this many copies instead.
    """
    remainder = count % batch_size
    if remainder == 0 or replicas == 1:
        return 0
    per_replica = -(-remainder // replicas)
    return remainder % replicas if per_replica * (replicas - 1) >= remainder else 0


def splittable_over_replicas(
    dataset: tf.data.Dataset, count: int, batch_size: int, replicas: int
) -> tf.data.Dataset:
    """`dataset` of `count` unbatched examples, less what `left_out_of_last_batch` leaves out."""
    left_out = left_out_of_last_batch(count, batch_size, replicas)
    return dataset.take(count - left_out) if left_out else dataset


def image_dataset(
    images: Iterable[LabeledImage],
    image_size: Sequence[int],
    batch_size: int,
    shuffle_seed: int | None = None,
    cache_file: Path | None = None,
    replicas: int = 1,
):
    """A batched, prefetched `tf.data.Dataset` of `(images, labels)` decoded in parallel.

    With several `replicas`, what of the last batch would leave one of them empty is left out
    (`left_out_of_last_batch`).

    With `cache_file`, each image is decoded and resized once, here, and stored as uint8 in
    that file; every epoch reads it back instead of decoding JPEGs again, which on a CPU
    leaves both cores to training. The file holds N x height x width x 3 bytes, on disk
    rather than in memory, so memory stays flat as the dataset grows.
    """
    images = list(images)
    paths = [str(item.path) for item in images]
    labels = [float(item.label) for item in images]
    size = tuple(image_size)
    dataset = tf.data.Dataset.from_tensor_slices((paths, labels))
    if shuffle_seed is not None:
        # Cached: shuffled once before the cache (the files are sorted by class) and then
        # within a bounded buffer each epoch; a full-size buffer of pixels would hold the
        # whole dataset in memory.
        cached = cache_file is not None
        dataset = dataset.shuffle(
            len(paths), seed=shuffle_seed, reshuffle_each_iteration=not cached
        )
    # Before the cache, which is only kept when an epoch reads all of it.
    dataset = splittable_over_replicas(dataset, len(paths), batch_size, replicas)
    dataset = dataset.map(
        lambda path, label: (load_image(path, size), label),
        num_parallel_calls=tf.data.AUTOTUNE,
    )
    if cache_file is not None:
        dataset = dataset.map(lambda image, label: (to_uint8(image), label)).cache(str(cache_file))
        fill(dataset)
        if shuffle_seed is not None:
            dataset = dataset.shuffle(CACHED_SHUFFLE_BUFFER, seed=shuffle_seed)
        dataset = dataset.map(lambda image, label: (tf.cast(image, tf.float32), label))
    return dataset.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def fill(cached: tf.data.Dataset) -> None:
    """Reads a cached dataset through once, so that its cache file is complete before anyone
    reads part of it. Keras reads one batch of the training and validation data to build the
    model before the first epoch; from a cache still being written, such a partial read
    throws the part written away, with a warning each time."""
    for _ in cached.batch(FILL_BATCH).prefetch(1):
        pass


FILL_BATCH = 256  # images per step of `fill`: few Python round trips, ~17 MB at 150x150


def to_uint8(image):
    """0-255 floats rounded to bytes: what a JPEG holds, a quarter of float32's size."""
    return tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)


@contextmanager
def training_datasets(
    train: Iterable[LabeledImage],
    validation: Iterable[LabeledImage],
    image_size: Sequence[int],
    batch_size: int,
    seed: int,
    cache: bool,
    replicas: int = 1,
) -> Iterator[tuple[tf.data.Dataset, tf.data.Dataset]]:
    """Shuffled training and ordered validation datasets, cached in a temporary folder.

    `batch_size` is the global batch, split over `replicas`.

    The folder (under `TMPDIR`) and its cache files are removed when the block ends, however
    it ends; if the process is killed first, by the next run (`files.scratch_dir`).
    """
    with scratch_dir("pipeline-image-cache-") as folder:

        def cache_file(name: str) -> Path | None:
            return folder / name if cache else None

        yield (
            image_dataset(train, image_size, batch_size, seed, cache_file("train"), replicas),
            image_dataset(
                validation,
                image_size,
                batch_size,
                cache_file=cache_file("validation"),
                replicas=replicas,
            ),
        )


def predict_dog_probability(model, images: tf.data.Dataset, mirror: bool = False) -> np.ndarray:
    """P(dog) for each image of a dataset of image batches; with `mirror`, the mean of each
    image's and its horizontal mirror's (test-time augmentation: a cat seen mirrored is
    still a cat, and two views average out some of either's mistakes)."""
    if mirror:
        # Both views in one model, so each image is read and decoded once.
        inputs = keras.Input(shape=model.input_shape[1:])
        views = (model(inputs) + model(keras.ops.flip(inputs, axis=2))) / 2
        model = keras.Model(inputs, views)
    return model.predict(images, verbose=0).ravel()
