from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from pipeline.models import build_head
from pipeline.train_head import feature_dataset
from pipeline.training import fit, save_training_outputs
from tests.conftest import tiny_config


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
    assert history["val_accuracy"][-1] > 0.9
    summary = save_training_outputs(model, history, tmp_path / "m/head.keras", tmp_path / "r", "t")
    assert (tmp_path / "m/head.keras").exists() and (tmp_path / "r/history.png").exists()
    rows = list(csv.DictReader((tmp_path / "r/history.csv").open()))
    assert len(rows) == summary["epochs_run"] and rows[0]["epoch"] == "1"
    assert {"loss", "val_loss", "accuracy", "val_accuracy"} <= set(rows[0])
