from __future__ import annotations

import csv
from pathlib import Path

import pytest

from pipeline.models import build_cnn, for_inference
from pipeline.predict import main
from tests.conftest import tiny_config, write_kaggle_tree


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    cfg = tiny_config().train_cnn.model_copy(update={"conv_filters": [4], "dense_units": [4]})
    path = tmp_path_factory.mktemp("model") / "cnn.keras"
    for_inference(build_cnn(cfg)).save(path)  # as train_cnn saves it
    return path


def test_predict_writes_a_row_per_image_and_skips_bad_inputs(tmp_path, model_path, capsys):
    write_kaggle_tree(tmp_path / "photos", per_class=3)
    (tmp_path / "photos/train/broken.jpg").write_bytes(b"oops")
    single = tmp_path / "photos/train/cat.0.jpg"
    out = tmp_path / "predictions.csv"

    main(["--model", str(model_path), str(tmp_path / "photos"), str(single), "--out", str(out)])

    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 7  # six from the folder, the single file again
    probs = {row["file"]: float(row["prob_dog"]) for row in rows}
    assert all(0 <= p <= 1 for p in probs.values()) and len(set(probs.values())) > 1
    for row in rows:
        assert row["label"] == ("dog" if float(row["prob_dog"]) >= 0.5 else "cat")
    # The file given on its own gets the same probability as in its folder.
    assert [float(r["prob_dog"]) for r in rows if r["file"] == single.as_posix()] == [
        probs[single.as_posix()]
    ] * 2
    assert "skipped" in capsys.readouterr().err

    main(["--model", str(model_path), str(single), "--threshold", "0", "--out", str(out)])
    assert [row["label"] for row in csv.DictReader(out.open())] == ["dog"]


def test_predict_without_model_or_images_exits_with_a_message(tmp_path, model_path):
    with pytest.raises(SystemExit, match="not found"):
        main(["--model", str(tmp_path / "nope.keras"), str(tmp_path)])
    with pytest.raises(SystemExit, match="no readable images"):
        main(["--model", str(model_path), str(tmp_path / "missing.jpg")])


def test_kaggle_submission_has_every_id_in_order(tmp_path, model_path):
    from tests.conftest import jpeg_bytes, photo

    test1 = tmp_path / "test1"
    test1.mkdir()
    for image_id in (10, 2, 1):
        (test1 / f"{image_id}.jpg").write_bytes(jpeg_bytes(photo(image_id % 2, image_id)))
    (test1 / "3.jpg").write_bytes(b"")  # unreadable, still needs a row
    out = tmp_path / "submission.csv"

    main(["--model", str(model_path), str(test1), "--kaggle-submission", "--out", str(out)])

    rows = list(csv.reader(out.open()))
    assert rows[0] == ["id", "label"]
    assert [int(r[0]) for r in rows[1:]] == [1, 2, 3, 10]
    assert float(rows[3][1]) == 0.5
    assert all(0 <= float(r[1]) <= 1 for r in rows[1:])


def test_kaggle_submission_refuses_files_not_named_by_id(tmp_path, model_path):
    write_kaggle_tree(tmp_path / "photos", per_class=1)
    with pytest.raises(SystemExit, match="not named like Kaggle's test images"):
        main(["--model", str(model_path), str(tmp_path / "photos"), "--kaggle-submission"])
