"""The tf.data input: decoded images match with or without the uint8 cache, and it cleans up."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest

from devtools.fakes import write_kaggle_tree
from pipeline.datasets import image_dataset, left_out_of_last_batch, training_datasets
from pipeline.images import LabeledImage

SIZE = (24, 20)


@pytest.fixture
def images(tmp_path: Path) -> list[LabeledImage]:
    paths = write_kaggle_tree(tmp_path / "src", per_class=6)
    return [LabeledImage(path, int(path.name.startswith("dog"))) for path in paths]


def epoch(dataset) -> tuple[np.ndarray, np.ndarray]:
    batches = list(dataset.as_numpy_iterator())
    return np.concatenate([x for x, _ in batches]), np.concatenate([y for _, y in batches])


def test_cached_pixels_are_the_decoded_ones_rounded(images, tmp_path: Path) -> None:
    plain_x, plain_y = epoch(image_dataset(images, SIZE, 5))
    cache = tmp_path / "cache"
    cached = image_dataset(images, SIZE, 5, cache_file=cache)
    first_x, first_y = epoch(cached)
    second_x, second_y = epoch(cached)  # read back from the cache file
    assert plain_x.shape == first_x.shape == (12, *SIZE, 3) and first_x.dtype == np.float32
    assert np.abs(first_x - plain_x).max() <= 0.5
    np.testing.assert_array_equal(first_x, second_x)
    np.testing.assert_array_equal(first_y, plain_y)
    np.testing.assert_array_equal(second_y, plain_y)
    assert cache.with_suffix(".index").is_file()


def test_cached_training_data_is_shuffled_each_epoch_and_keeps_every_image(images, tmp_path):
    dataset = image_dataset(images, SIZE, 12, shuffle_seed=3, cache_file=tmp_path / "cache")
    orders = [epoch(dataset) for _ in range(3)]
    labels = [y for _, y in orders]
    assert all(sorted(y) == [0.0] * 6 + [1.0] * 6 for y in labels)
    assert not all(np.array_equal(labels[0], y) for y in labels[1:])
    # The same images every epoch, in another order: compare them as a sorted set of sums.
    sums = [np.sort(x.reshape(len(x), -1).sum(axis=1)) for x, _ in orders]
    np.testing.assert_allclose(sums[0], sums[2])


@pytest.mark.parametrize("cache", [True, False])
def test_training_datasets_cache_only_when_asked_and_clean_up(
    images, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cache: bool
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    with training_datasets(images[:8], images[8:], SIZE, 4, seed=0, cache=cache) as (train, val):
        train_x, _ = epoch(train)
        val_x, val_y = epoch(val)
        (folder,) = (tmp_path / "tmp").iterdir()
        written = sorted(path.name for path in folder.iterdir())
    assert len(train_x) == 8 and len(val_x) == len(val_y) == 4
    assert any(name.startswith("train") for name in written) == cache
    assert any(name.startswith("validation") for name in written) == cache
    assert not folder.exists()


@pytest.mark.parametrize("source_size", [(12, 10), (24, 20), (60, 44), (16, 40)])
def test_load_image_matches_an_antialiased_resize_whether_it_shrinks_or_grows(
    tmp_path: Path, source_size: tuple[int, int]
) -> None:
    import tensorflow as tf

    from devtools.fakes import jpeg_bytes, photo
    from pipeline.datasets import load_image

    path = tmp_path / "image.jpg"
    path.write_bytes(jpeg_bytes(photo(1, seed=4, size=source_size)))
    decoded = tf.io.decode_jpeg(path.read_bytes(), channels=3)
    expected = tf.image.resize(decoded, SIZE, antialias=True).numpy()
    np.testing.assert_allclose(load_image(str(path), SIZE).numpy(), expected, atol=1e-3)


def shares(examples: int, replicas: int) -> list[int]:
    """How TensorFlow splits a batch: ceil(n / replicas) to each replica in turn."""
    each = -(-examples // replicas)
    return [min(each, max(examples - i * each, 0)) for i in range(replicas)]


@pytest.mark.parametrize(
    ("count", "batch", "replicas", "left_out"),
    [
        (9, 8, 1, 0),
        (16, 8, 2, 0),
        (9, 8, 2, 1),
        (10, 8, 2, 0),
        (1, 8, 2, 1),
        (3, 8, 4, 3),
        (21, 16, 4, 1),  # 5: 2, 2, 1, 0
        (22, 16, 4, 2),  # 6: 2, 2, 2, 0
        (25, 16, 4, 1),  # 9: 3, 3, 3, 0
        (23, 16, 4, 0),  # 7: 2, 2, 2, 1
        (19, 16, 3, 0),  # 3: 1, 1, 1
        (20, 16, 3, 1),  # 4: 2, 2, 0
    ],
)
def test_the_last_batch_leaves_no_replica_without_an_example(
    count: int, batch: int, replicas: int, left_out: int
) -> None:
    assert left_out_of_last_batch(count, batch, replicas) == left_out
    last = (count - left_out) % batch
    assert last == 0 or min(shares(last, replicas)) > 0


@pytest.mark.parametrize("cache", [False, True])
def test_several_replicas_never_get_a_batch_smaller_than_their_number(
    images, tmp_path: Path, cache: bool
) -> None:
    # 12 images in batches of 11: a last batch of 1, which two replicas cannot share.
    cache_file = tmp_path / "cache" if cache else None
    dataset = image_dataset(images, SIZE, 11, shuffle_seed=0, cache_file=cache_file, replicas=2)
    for _ in range(2):  # the second epoch reads the cache
        assert [len(y) for _, y in dataset.as_numpy_iterator()] == [11]
    assert [len(y) for _, y in image_dataset(images, SIZE, 11).as_numpy_iterator()] == [11, 1]


def test_mirror_averages_each_images_and_its_mirrors_probability() -> None:
    import keras
    import tensorflow as tf

    from pipeline.datasets import predict_dog_probability

    # P(dog) grows with the red in the left half of the image: mirroring changes it.
    inputs = keras.Input((8, 8, 3))
    left_red = keras.layers.Cropping2D(((0, 0), (0, 4)))(inputs)
    pooled = keras.layers.GlobalAveragePooling2D()(left_red)
    dense = keras.layers.Dense(1, activation="sigmoid")
    model = keras.Model(inputs, dense(pooled))
    dense.set_weights([np.array([[0.05], [0.0], [0.0]], "float32"), np.array([-3.0], "float32")])
    images = np.random.default_rng(0).uniform(0, 255, (5, 8, 8, 3)).astype("float32")
    batches = tf.data.Dataset.from_tensor_slices(images).batch(2)

    plain = predict_dog_probability(model, batches)
    mirrored = model.predict(images[:, :, ::-1], verbose=0).ravel()
    averaged = predict_dog_probability(model, batches, mirror=True)

    np.testing.assert_allclose(plain, model.predict(images, verbose=0).ravel(), rtol=1e-6)
    assert not np.allclose(plain, mirrored)
    np.testing.assert_allclose(averaged, (plain + mirrored) / 2, rtol=1e-6)


def test_the_cache_is_complete_before_anything_reads_part_of_it(images, tmp_path: Path) -> None:
    """Keras reads one batch to build the model before the first epoch: from a cache still
    being written, that would throw the cache away (TensorFlow's "did not fully read" warning)."""
    cache = tmp_path / "train"
    dataset = image_dataset(images, SIZE, 5, shuffle_seed=0, cache_file=cache)
    index = Path(f"{cache}.index")
    assert index.is_file()  # written whole, before any epoch
    next(iter(dataset))  # a partial read
    assert index.is_file() and len(epoch(dataset)[1]) == len(images)


def test_the_cache_a_killed_run_left_is_removed_by_the_next_run(
    images, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGKILL (or the OOM killer) skips every `with` block: the next run cleans up instead."""
    import os
    import signal
    import subprocess
    import sys

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    script = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from pipeline.datasets import training_datasets\n"
        "from pipeline.images import LabeledImage\n"
        "images = [LabeledImage(Path(p), 0) for p in sys.argv[1:]]\n"
        "with training_datasets(images[:8], images[8:], (24, 20), 4, 0, True) as (train, _):\n"
        "    for _ in train: pass\n"  # writes the cache
        "    print('cached', flush=True)\n"
        "    time.sleep(60)\n"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", script, *(str(i.path) for i in images)],
        stdout=subprocess.PIPE,
        env={**os.environ, "TMPDIR": str(scratch)},
        text=True,
    )
    assert child.stdout.readline() == "cached\n"
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    (leftover,) = scratch.glob("pipeline-image-cache-*")  # beside autograph's own files
    assert any(leftover.iterdir())  # the killed run's cache files

    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    with training_datasets(images[:8], images[8:], SIZE, 4, seed=0, cache=True):
        assert not leftover.exists()
