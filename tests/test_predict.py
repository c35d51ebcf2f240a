from __future__ import annotations

import csv
from pathlib import Path

import pytest

from devtools.fakes import write_kaggle_tree
from pipeline.cnn import build_cnn
from pipeline.errors import PipelineError
from pipeline.precision import for_inference
from pipeline.predict import main
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    import keras

    cfg = tiny_config().train_cnn.model_copy(update={"block_filters": [4], "dense_units": []})
    path = tmp_path_factory.mktemp("model") / "cnn.keras"
    keras.utils.set_random_seed(0)  # untrained weights whose P(dog) differs between images
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
    with pytest.raises(PipelineError, match="not found"):
        main(["--model", str(tmp_path / "nope.keras"), str(tmp_path)])
    with pytest.raises(PipelineError, match="no readable images"):
        main(["--model", str(model_path), str(tmp_path / "missing.jpg")])


def test_kaggle_submission_has_every_id_in_order(tmp_path, model_path):
    from devtools.fakes import jpeg_bytes, photo

    test1 = tmp_path / "test1"
    test1.mkdir()
    for image_id in (10, 2, 1):
        (test1 / f"{image_id}.jpg").write_bytes(jpeg_bytes(photo(image_id % 2, image_id)))
    (test1 / "3.jpg").write_bytes(b"")  # unreadable, still needs a row
    out = tmp_path / "submission.csv"

    again = [str(test1 / "2.jpg"), str(test1 / "3.jpg")]  # given twice: one row each still
    args = ["--model", str(model_path), str(test1), *again, "--kaggle-submission"]
    main([*args, "--out", str(out)])

    rows = list(csv.reader(out.open()))
    assert rows[0] == ["id", "label"]
    assert [int(r[0]) for r in rows[1:]] == [1, 2, 3, 10]
    assert float(rows[3][1]) == 0.5
    assert all(0 <= float(r[1]) <= 1 for r in rows[1:])


def test_kaggle_submission_refuses_files_not_named_by_id(tmp_path, model_path):
    write_kaggle_tree(tmp_path / "photos", per_class=1)
    with pytest.raises(PipelineError, match="not named like Kaggle's test images"):
        main(["--model", str(model_path), str(tmp_path / "photos"), "--kaggle-submission"])


def test_images_training_would_re_encode_are_re_encoded_here_too(tmp_path, model_path):
    from PIL import Image

    from pipeline.images import reencode_as_jpeg

    folder = tmp_path / "odd"
    folder.mkdir()
    Image.new("1", (40, 40), 1).save(folder / "bw.bmp")  # TensorFlow cannot decode 1-bit BMPs
    rgba = Image.new("RGBA", (40, 40), (200, 30, 30, 0))  # transparent: white, as in training
    rgba.save(folder / "clear.png")
    (tmp_path / "white.jpg").write_bytes(reencode_as_jpeg((folder / "clear.png").read_bytes()))
    out = tmp_path / "p.csv"

    main(["--model", str(model_path), str(folder), str(tmp_path / "white.jpg"), "--out", str(out)])

    probs = {Path(r["file"]).name: float(r["prob_dog"]) for r in csv.DictReader(out.open())}
    assert set(probs) == {"bw.bmp", "clear.png", "white.jpg"}
    assert probs["clear.png"] == probs["white.jpg"]


def test_predict_refuses_outputs_that_would_overwrite_an_input(tmp_path, model_path):
    write_kaggle_tree(tmp_path / "photos", per_class=1)
    photo = tmp_path / "photos/train/cat.0.jpg"
    before = photo.read_bytes()
    for out in (photo, tmp_path / "photos", tmp_path / "new.png"):
        with pytest.raises(PipelineError, match=r"would overwrite a file it reads|is a folder"):
            main(["--model", str(model_path), str(photo), "--out", str(out)])
    assert photo.read_bytes() == before and not (tmp_path / "new.png").exists()


def test_predict_refuses_an_out_that_an_image_link_in_a_folder_points_to(tmp_path, model_path):
    """Only the link's name is an image's: `--out` is compared with the file it points to."""
    write_kaggle_tree(tmp_path / "photos", per_class=1)
    target = tmp_path / "old-predictions.csv"
    target.write_bytes(b"file,prob_dog,label\r\n")  # one predict wrote: it may be replaced...
    (tmp_path / "photos/train/x.jpg").symlink_to(target)
    with pytest.raises(PipelineError, match="would overwrite a file it reads"):  # ...but not read
        main(["--model", str(model_path), str(tmp_path / "photos"), "--out", str(target)])
    assert target.read_bytes() == b"file,prob_dog,label\r\n"


def test_predict_refuses_a_model_that_does_not_classify_images(tmp_path):
    from pipeline.transfer import build_head

    head = tmp_path / "head.keras"
    for_inference(build_head(8, tiny_config().head)).save(head)  # as train_head saves it
    (tmp_path / "text.keras").write_text("not a model")
    write_kaggle_tree(tmp_path / "photos", per_class=1)
    with pytest.raises(PipelineError, match=r"not images to P\(dog\)"):
        main(["--model", str(head), str(tmp_path / "photos")])
    with pytest.raises(PipelineError, match=r"text\.keras is not a Keras model file"):
        main(["--model", str(tmp_path / "text.keras"), str(tmp_path / "photos")])


@pytest.mark.parametrize(
    "content",
    [bytes(range(256)) * 8, b"", "zip"],
    ids=["random-bytes", "empty", "zip-without-a-model"],
)
def test_a_garbage_keras_file_is_named_as_such_not_as_missing(tmp_path, content):
    import zipfile

    garbage = tmp_path / "model.keras"
    if content == "zip":
        with zipfile.ZipFile(garbage, "w") as zf:
            zf.writestr("notes.txt", "hello")
    else:
        garbage.write_bytes(content)
    write_kaggle_tree(tmp_path / "photos", per_class=1)
    with pytest.raises(PipelineError) as error:
        main(["--model", str(garbage), str(tmp_path / "photos")])
    message = str(error.value)
    assert message.startswith(f"{garbage} is not a Keras model file")
    assert "not found" not in message and "\n" not in message


@pytest.mark.parametrize("option", [["--batch-size", "0"], ["--threshold", "2"]])
def test_predict_refuses_out_of_range_options(tmp_path, model_path, option):
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", str(model_path), str(tmp_path), *option])
    assert exit_info.value.code == 2  # argparse's usage error


@pytest.mark.parametrize("names", [["1.jpg", "01.jpg"], ["5.jpg", "5.png"], ["².jpg"]])
def test_kaggle_submission_refuses_ids_that_clash_or_are_not_numbers(tmp_path, model_path, names):
    from devtools.fakes import jpeg_bytes, photo

    test1 = tmp_path / "test1"
    test1.mkdir()
    for name in names:
        (test1 / name).write_bytes(jpeg_bytes(photo(0, 1)))
    with pytest.raises(PipelineError, match=r"both claim id|not named like Kaggle"):
        main(["--model", str(model_path), str(test1), "--kaggle-submission"])


def test_tta_gives_the_mean_of_each_image_and_its_mirror(tmp_path, model_path):
    import keras
    import numpy as np

    from pipeline.datasets import load_image

    write_kaggle_tree(tmp_path / "photos", per_class=2)
    model = keras.models.load_model(model_path)
    runs = {}
    for name, extra in (("plain", []), ("tta", ["--tta"])):
        out = tmp_path / f"{name}.csv"
        main(["--model", str(model_path), str(tmp_path / "photos"), *extra, "--out", str(out)])
        runs[name] = {row["file"]: float(row["prob_dog"]) for row in csv.DictReader(out.open())}
    for file, averaged in runs["tta"].items():
        image = np.asarray(load_image(file, (32, 32)))
        mirrored = float(model.predict(image[None, :, ::-1], verbose=0)[0, 0])
        assert averaged == pytest.approx((runs["plain"][file] + mirrored) / 2, abs=2e-6)


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("params.yaml", "common:\n  seed: 42\n"),
        ("notes.csv", "name,score\nrex,3\n"),  # a CSV, but not one predict wrote
        ("empty.csv", ""),
        ("photo.csv", "\xff\xd8\xff\xe0 not text"),
    ],
    ids=["yaml", "someone-elses-csv", "empty", "binary"],
)
def test_predict_never_overwrites_a_file_it_did_not_write(tmp_path, model_path, name, content):
    write_kaggle_tree(tmp_path / "photos", per_class=1)
    out = tmp_path / name
    out.write_text(content, encoding="latin-1")
    before = out.read_bytes()
    with pytest.raises(PipelineError) as error:
        main(["--model", str(model_path), str(tmp_path / "photos"), "--out", str(out)])
    message = str(error.value)
    assert message == (
        f"--out {out} exists and is not a CSV that predict wrote; "
        "give a new file name, or remove it first"
    )
    assert out.read_bytes() == before


@pytest.mark.parametrize("header", ["file,prob_dog,label", "id,label"])
def test_predict_replaces_a_csv_it_wrote_before(tmp_path, model_path, header):
    write_kaggle_tree(tmp_path / "photos", per_class=1)
    out = tmp_path / "old.csv"
    out.write_bytes(f"{header}\r\nsomething,0.5,cat\r\n".encode())
    main(["--model", str(model_path), str(tmp_path / "photos"), "--out", str(out)])
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 2 and set(rows[0]) == {"file", "prob_dog", "label"}


def test_a_models_uri_outside_the_repository_names_the_store_and_creates_none(
    tmp_path, monkeypatch
):
    from devtools.fakes import jpeg_bytes, photo

    (tmp_path / "cat.jpg").write_bytes(jpeg_bytes(photo(0, seed=1)))
    monkeypatch.chdir(tmp_path)  # no dvc.yaml here or above: not a repository
    for name in ("MLFLOW_TRACKING_URI", "DVC_ROOT"):
        monkeypatch.setenv(name, "")  # set, then delete: teardown also removes what MLflow sets
        monkeypatch.delenv(name)
    with pytest.raises(PipelineError) as error:
        main(["--model", "models:/dogs-vs-cats@champion", "cat.jpg"])
    message = str(error.value)
    assert f"no MLflow store at {tmp_path.resolve() / 'mlflow.db'}" in message
    assert "\n" not in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cat.jpg"]  # no stray mlflow.db


def test_a_models_uri_missing_from_the_store_names_the_store(tmp_path, monkeypatch):
    import mlflow

    from devtools.fakes import jpeg_bytes, photo

    (tmp_path / "cat.jpg").write_bytes(jpeg_bytes(photo(0, seed=1)))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.MlflowClient(uri).search_experiments()  # creates the store, holding no model
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with pytest.raises(PipelineError, match=f"from the MLflow store {uri}: "):
        main(["--model", "models:/dogs-vs-cats@champion", str(tmp_path / "cat.jpg")])
