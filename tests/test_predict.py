from __future__ import annotations

import csv
from pathlib import Path

import pytest

from pipeline.config import TrainCnnConfig
from pipeline.models import build_cnn
from pipeline.predict import main
from tests.conftest import write_kaggle_tree


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    cfg = TrainCnnConfig(
        image_size=(32, 32),
        conv_filters=[4],
        dense_units=[4],
        dropout=0.0,
        batch_norm=False,
        optimizer="adam",
        learning_rate=1e-3,
        momentum=0.9,
        batch_size=4,
        epochs=1,
        patience=1,
        use_augmented=False,
    )
    path = tmp_path_factory.mktemp("model") / "cnn.keras"
    build_cnn(cfg).save(path)
    return path


def test_predict_writes_a_row_per_image_and_skips_bad_inputs(tmp_path, model_path, capsys):
    write_kaggle_tree(tmp_path / "photos", per_class=3)
    (tmp_path / "photos/train/broken.jpg").write_bytes(b"oops")
    single = tmp_path / "photos/train/cat.0.jpg"
    out = tmp_path / "predictions.csv"

    main(["--model", str(model_path), str(tmp_path / "photos"), str(single), "--out", str(out)])

    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 7  # six from the folder, the single file again
    assert all(0 <= float(row["prob_dog"]) <= 1 for row in rows)
    assert {row["label"] for row in rows} <= {"cat", "dog"}
    assert "skipped" in capsys.readouterr().err


def test_predict_without_model_or_images_exits_with_a_message(tmp_path, model_path):
    with pytest.raises(SystemExit, match="not found"):
        main(["--model", str(tmp_path / "nope.keras"), str(tmp_path)])
    with pytest.raises(SystemExit, match="no readable images"):
        main(["--model", str(model_path), str(tmp_path / "missing.jpg")])
