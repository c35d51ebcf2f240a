from __future__ import annotations

import csv
from pathlib import Path

import keras
import mlflow
import numpy as np
import pytest
import tensorflow as tf
from mlflow.tracking import MlflowClient

from pipeline.datasets import image_dataset
from pipeline.train_head import feature_dataset
from pipeline.training import (
    PreciseBatchNorm,
    TrainingDivergedError,
    fit,
    log_and_record_model,
    recompute_batch_norm_statistics,
    save_training_outputs,
)
from pipeline.transfer import build_head
from tests.conftest import tiny_config, write_split_folder


def test_head_learns_separable_features_and_outputs_are_saved(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 40).astype(np.int8)
    features = rng.normal(0, 1, (80, 6)).astype("float32") + labels[:, None] * 2.0
    cfg = tiny_config().head.model_copy(
        update={
            "units": 8,
            "dropout": 0.1,
            "learning_rate": 0.01,
            "batch_size": 16,
            "epochs": 15,
            "patience": 3,
        }
    )
    model = build_head(6, cfg)
    history = fit(
        model,
        feature_dataset(features, labels, 16, shuffle_seed=0),
        feature_dataset(features, labels, 16),
        cfg,
        log_to_mlflow=False,
    )
    assert history["val/accuracy"][-1] > 0.9
    summary = save_training_outputs(
        {tmp_path / "m/head.keras": model}, history, tmp_path / "r", "t"
    )
    assert (tmp_path / "m/head.keras").exists() and (tmp_path / "r/history.png").exists()
    rows = list(csv.DictReader((tmp_path / "r/history.csv").open()))
    assert len(rows) == summary["epochs_run"] and rows[0]["epoch"] == "1"
    assert {"train/loss", "val/loss", "train/accuracy", "val/accuracy"} <= set(rows[0])


def test_fit_keeps_the_best_epochs_weights_not_the_last(tmp_path: Path) -> None:
    # A wide head at a high learning rate on barely separable validation data overfits at
    # once: validation loss is lowest early and rises after.
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    labels, val_labels = np.repeat([0, 1], 40).astype(np.int8), np.repeat([0, 1], 20)
    features = rng.normal(0, 1, (80, 6)).astype("float32") + labels[:, None] * 2.0
    val = rng.normal(0, 1, (40, 6)).astype("float32") + val_labels[:, None] * 0.5
    cfg = tiny_config().head.model_copy(
        update={"units": 64, "dropout": 0.0, "learning_rate": 0.05, "epochs": 8, "patience": 8}
    )
    model = build_head(6, cfg)
    validation = feature_dataset(val, val_labels.astype(np.int8), 8)
    history = fit(model, feature_dataset(features, labels, 8, 0), validation, cfg, False)
    best = int(np.argmin(history["val/loss"]))
    assert best < len(history["val/loss"]) - 1  # the last epoch is worse than the best
    loss = model.evaluate(validation, verbose=0, return_dict=True)["loss"]
    assert loss == pytest.approx(history["val/loss"][best], rel=1e-4)


def test_fit_exits_with_a_message_when_every_epoch_diverged() -> None:
    labels = np.repeat([0, 1], 8).astype(np.int8)
    cfg = tiny_config().head.model_copy(update={"units": 4, "epochs": 2, "patience": 5})
    model = build_head(4, cfg)
    output = model.layers[-1]  # NaN weights: NaN outputs and loss from the first step on
    output.set_weights([np.full_like(w, np.nan) for w in output.get_weights()])
    data = feature_dataset(np.ones((16, 4), dtype="float32"), labels, 8)
    with pytest.raises(TrainingDivergedError, match=r"diverged.*lower the learning rate"):
        fit(model, data, data, cfg, log_to_mlflow=False)


def test_feature_batches_are_float32_rows_with_their_labels_in_shuffled_order() -> None:
    # Row i holds i in every column and the label i, stored as float16 as on disk.
    rows = np.repeat(np.arange(20, dtype=np.float16)[:, None], 3, axis=1)
    labels = np.arange(20)
    epochs = []
    dataset = feature_dataset(rows, labels, 8, shuffle_seed=0)
    for _ in range(2):
        batches = list(dataset.as_numpy_iterator())
        assert [len(y) for _, y in batches] == [8, 8, 4]
        seen = np.concatenate([x for x, _ in batches])
        assert seen.dtype == np.float32 and (seen == seen[:, :1]).all()
        np.testing.assert_array_equal(np.concatenate([y for _, y in batches]), seen[:, 0])
        epochs.append(seen[:, 0].astype(int).tolist())
    assert sorted(epochs[0]) == list(range(20)) and epochs[0] != list(range(20))
    assert epochs[0] != epochs[1]  # reshuffled each epoch
    # Shuffling indices gives the order shuffling the rows themselves would.
    rows_shuffled = tf.data.Dataset.from_tensor_slices(rows.astype(np.float32)).shuffle(
        20, seed=0, reshuffle_each_iteration=True
    )
    assert [int(row[0]) for row in rows_shuffled.as_numpy_iterator()] == epochs[0]
    in_order = feature_dataset(rows, labels, 8)
    assert np.concatenate([x for x, _ in in_order.as_numpy_iterator()])[:, 0].tolist() == list(
        range(20)
    )


def test_feature_batches_leave_no_replica_without_an_example() -> None:
    # 17 in batches of 8 over two replicas: a last batch of 1 cannot be shared, so it is left out.
    rows = np.arange(17, dtype=np.float16)[:, None]
    dataset = feature_dataset(rows, np.arange(17), 8, replicas=2)
    batches = list(dataset.as_numpy_iterator())
    assert [len(y) for _, y in batches] == [8, 8]
    np.testing.assert_array_equal(np.concatenate([x for x, _ in batches])[:, 0], np.arange(16))


def test_steps_per_execution_changes_no_update(tmp_path: Path) -> None:
    # Several batches per compiled call: the same weights after three epochs and the same
    # history every epoch, dropout and the last partial call (10 batches in calls of 4) included.
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 2, 80).astype(np.int8)
    features = np.maximum(rng.normal(0, 1, (80, 6)), 0).astype("float32")
    cfg = tiny_config().head.model_copy(update={"units": 8, "epochs": 3, "patience": 3})
    trained = {}
    for per_call in (1, 4):
        keras.utils.set_random_seed(0)
        model = build_head(6, cfg, steps_per_execution=per_call)
        assert model.steps_per_execution == per_call
        history = fit(
            model,
            feature_dataset(features, labels, 8, shuffle_seed=0),
            feature_dataset(features, labels, 8),
            cfg,
            log_to_mlflow=False,
        )
        trained[per_call] = (model.get_weights(), history)
    (one_weights, one_history), (four_weights, four_history) = trained[1], trained[4]
    assert one_history == four_history and len(one_history["train/loss"]) == 3
    for one, four in zip(one_weights, four_weights, strict=True):
        np.testing.assert_array_equal(one, four)


def test_epoch_metrics_are_in_the_store_before_the_run_ends(tmp_path: Path, monkeypatch) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    rng = np.random.default_rng(1)
    labels = np.repeat([0, 1], 16).astype(np.int8)
    features = rng.normal(0, 1, (32, 4)).astype("float32")
    cfg = tiny_config().head.model_copy(update={"units": 4, "epochs": 3, "patience": 5})
    data = feature_dataset(features, labels, 16)
    with mlflow.start_run() as run:
        history = fit(build_head(4, cfg), data, data, cfg)
        client = MlflowClient(uri)
        logged = client.get_metric_history(run.info.run_id, "val/loss")
        logged_run = client.get_run(run.info.run_id)
        keys = set(logged_run.data.metrics)
        artifacts = {artifact.path for artifact in client.list_artifacts(run.info.run_id)}
    assert [m.step for m in logged] == [1, 2, 3]  # epochs count from 1, as in history.csv
    assert [m.value for m in logged] == pytest.approx(history["val/loss"])
    assert {"train/loss", "train/accuracy", "val/accuracy"} == keys - {
        "val/loss",
        "val/auc",
        "train/auc",
    }
    # No optimizer_* params repeating the stage's own, no per-evaluation validation_* metrics.
    assert logged_run.data.params == {}
    assert "model_summary.txt" in artifacts


def batch_norm_model() -> keras.Model:
    """Random zoom, a conv, batch norm, pooling, a sigmoid: the CNN's shape in miniature."""
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.RandomZoom(0.5, seed=0)(inputs)
    x = keras.layers.Conv2D(4, 3, name="conv")(x)
    x = keras.layers.BatchNormalization(name="norm")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid")(x))


def test_batch_norm_statistics_become_the_average_over_the_images_without_augmentation() -> None:
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (48, 8, 8, 3)).astype("float32")
    labels = rng.integers(0, 2, 48).astype("float32")
    batches = tf.data.Dataset.from_tensor_slices((images, labels)).batch(16)
    model = batch_norm_model()
    norm = model.get_layer("norm")
    norm.moving_mean.assign(np.full(4, 50.0))  # stale, as training leaves them
    norm.moving_variance.assign(np.full(4, 9.0))

    assert recompute_batch_norm_statistics(model, batches, images=32) == 32

    # The conv's outputs on the first 32 images as given (no zoom), per batch of 16.
    conv = keras.Model(model.input, model.get_layer("conv").output)
    outputs = conv.predict(images[:32], verbose=0).reshape(2, -1, 4)
    np.testing.assert_allclose(norm.moving_mean, outputs.mean(axis=1).mean(axis=0), rtol=1e-4)
    np.testing.assert_allclose(norm.moving_variance, outputs.var(axis=1).mean(axis=0), rtol=1e-3)
    assert norm.momentum == pytest.approx(0.99)  # Keras's, restored for any later training


def test_batch_norm_statistics_stay_when_asked_for_no_images_or_there_is_no_batch_norm() -> None:
    batches = tf.data.Dataset.from_tensor_slices((np.ones((4, 8, 8, 3)), np.ones(4))).batch(2)
    model = batch_norm_model()
    assert recompute_batch_norm_statistics(model, batches, images=0) == 0
    np.testing.assert_array_equal(model.get_layer("norm").moving_mean, np.zeros(4))
    plain = keras.Sequential(
        [keras.Input((8, 8, 3)), keras.layers.Flatten(), keras.layers.Dense(1)]
    )
    assert recompute_batch_norm_statistics(plain, batches, images=4) == 0


def test_each_epoch_is_validated_and_kept_with_batch_norm_statistics_of_its_own_weights(
    tmp_path: Path,
) -> None:
    rng = np.random.default_rng(1)
    images = rng.uniform(0, 255, (32, 8, 8, 3)).astype("float32")
    labels = rng.integers(0, 2, 32).astype("float32")
    train = tf.data.Dataset.from_tensor_slices((images, labels)).batch(8)
    model = batch_norm_model()
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="binary_crossentropy")
    cfg = tiny_config().head.model_copy(update={"epochs": 1, "patience": 1})
    precise = PreciseBatchNorm(train, images=16)

    history = fit(model, train, train, cfg, log_to_mlflow=False, callbacks=[precise])

    # Four steps at Keras's momentum 0.99 leave the moving averages near their initial
    # zeros and ones; validated and kept, they are the first 16 images' under the weights.
    assert precise.images == 16
    conv = keras.Model(model.input, model.get_layer("conv").output)
    outputs = conv.predict(images[:16], verbose=0).reshape(2, -1, 4)
    norm = model.get_layer("norm")
    np.testing.assert_allclose(norm.moving_mean, outputs.mean(axis=1).mean(axis=0), rtol=1e-4)
    np.testing.assert_allclose(norm.moving_variance, outputs.var(axis=1).mean(axis=0), rtol=1e-3)
    assert not np.allclose(norm.moving_mean, 0, atol=0.5)
    evaluated = model.evaluate(train, verbose=0, return_dict=True)["loss"]
    assert history["val/loss"][-1] == pytest.approx(evaluated, rel=1e-4)


def colour_classifier(size: tuple[int, int]) -> keras.Model:
    """A model of raw images that learns the generated photos' colours within a few epochs."""
    inputs = keras.Input((*size, 3))
    pooled = keras.layers.GlobalAveragePooling2D()(keras.layers.Rescaling(1 / 255)(inputs))
    model = keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid")(pooled))
    model.compile(keras.optimizers.Adam(0.05), "binary_crossentropy", metrics=["accuracy"])
    return model


def test_the_logged_model_carries_the_metrics_of_the_epoch_whose_weights_it_holds(
    tmp_path: Path, monkeypatch
) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    keras.utils.set_random_seed(0)
    size = (16, 16)
    train = image_dataset(write_split_folder(tmp_path / "train", 8), size, 8, shuffle_seed=0)
    validation = image_dataset(write_split_folder(tmp_path / "validation", 4), size, 8)
    cfg = tiny_config().head.model_copy(update={"epochs": 4, "patience": 4})
    model = colour_classifier(size)
    artifacts = (tmp_path / "artifacts").as_uri()  # not ./mlruns in the repository
    experiment = mlflow.create_experiment("t", artifacts)
    with mlflow.start_run(experiment_id=experiment), mlflow.start_run(nested=True):
        history = fit(model, train, validation, cfg)
        summary = save_training_outputs({tmp_path / "m.keras": model}, history, tmp_path, "t")
        info = log_and_record_model(model, tmp_path / "m.keras", "c", tmp_path, summary)
    best = summary["best_epoch"]
    assert best > 1  # else the first epoch's numbers would be the right ones too
    logged = {metric.key: metric for metric in mlflow.get_logged_model(info.model_id).metrics}
    for name in ("val/loss", "val/accuracy", "train/loss", "train/accuracy"):
        assert logged[name].value == pytest.approx(history[name][best - 1]), name
        assert logged[name].step == best
    assert logged["val/loss"].value != pytest.approx(history["val/loss"][0])
