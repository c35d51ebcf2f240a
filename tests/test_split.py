from __future__ import annotations

import csv
import os
from collections import Counter
from pathlib import Path

import pytest

from devtools.fakes import write_kaggle_tree
from pipeline.config import SplitConfig
from pipeline.errors import BadInputError
from pipeline.images import LabeledImage, list_split
from pipeline.split import check_images, link_or_copy, split_files, summarize, write_split
from tests.conftest import set_params, snapshot


def fake_images(cats: int, dogs: int) -> list[LabeledImage]:
    return [LabeledImage(Path(f"cat.{i}.jpg"), 0) for i in range(cats)] + [
        LabeledImage(Path(f"dog.{i}.jpg"), 1) for i in range(dogs)
    ]


CFG = SplitConfig(validation_fraction=0.2, test_fraction=0.1)


def test_split_is_disjoint_complete_and_stratified() -> None:
    images = fake_images(100, 100)
    splits = split_files(images, CFG, seed=1)
    sizes = {name: len(items) for name, items in splits.items()}
    assert sizes == {"train": 140, "validation": 40, "test": 20}
    seen = [item.path for items in splits.values() for item in items]
    assert len(seen) == len(set(seen)) == 200
    for items in splits.values():
        counts = Counter(item.label for item in items)
        assert counts[0] == counts[1]


def test_split_depends_only_on_the_seed() -> None:
    images = fake_images(30, 30)
    first = split_files(images, CFG, seed=7)
    assert split_files(list(reversed(images)), CFG, seed=7) == first
    assert split_files(images, CFG, seed=8) != first


def test_cap_keeps_class_balance() -> None:
    splits = split_files(fake_images(300, 100), CFG.model_copy(update={"n": 40}), seed=0)
    everything = [item for items in splits.values() for item in items]
    assert len(everything) == 40
    assert Counter(item.label for item in everything) == {0: 30, 1: 10}


def test_too_few_images_give_a_clear_error() -> None:
    with pytest.raises(ValueError, match="too few"):
        split_files(fake_images(2, 2), CFG, seed=0)
    with pytest.raises(ValueError, match="both cats and dogs"):
        split_files(fake_images(10, 0), CFG, seed=0)


def test_bad_images_are_skipped_and_odd_formats_reencoded(tmp_path: Path) -> None:
    write_kaggle_tree(tmp_path / "raw", per_class=10)
    (tmp_path / "raw/train/cat.0.jpg").write_bytes(b"")
    png = tmp_path / "raw/train/dog.0.jpg"
    from PIL import Image

    with Image.open(tmp_path / "raw/train/dog.1.jpg") as image:
        image.save(png, format="PNG")
    images = [
        LabeledImage(p, 0 if p.name.startswith("cat") else 1)
        for p in sorted((tmp_path / "raw/train").iterdir())
    ]
    verdicts = check_images(images)
    problems = {v.image.path.name: v.problem for v in verdicts if v.problem}
    assert problems == {"cat.0.jpg": "empty file"}
    reencode = {v.image.path for v in verdicts if v.needs_reencoding}
    assert reencode == {png}

    usable = [v.image for v in verdicts if v.problem is None]
    splits = split_files(usable, SplitConfig(validation_fraction=0.25, test_fraction=0.25), seed=0)
    write_split(splits, reencode, tmp_path / "split")
    written = {
        i.path.name
        for s in ("train", "validation", "test")
        for i in list_split(tmp_path / "split" / s)
    }
    assert len(written) == 19 and "dog.0.jpg" in written
    for split in ("train", "validation", "test"):
        for image in list_split(tmp_path / "split" / split):  # labelled by its folder
            assert image.path.name.startswith(("cat", "dog")[image.label]), image.path
    dog0 = next((tmp_path / "split").rglob("dog.0.jpg")).read_bytes()
    assert dog0[:3] == b"\xff\xd8\xff"  # now a JPEG
    # The others share the raw file's bytes on disk instead of a copy; raw is unchanged.
    cat1 = next((tmp_path / "split").rglob("cat.1.jpg"))
    raw_cat1 = tmp_path / "raw/train/cat.1.jpg"
    assert cat1.samefile(raw_cat1) and raw_cat1.read_bytes()[:3] == b"\xff\xd8\xff"
    summary = summarize(splits, skipped=1, reencoded=1)
    assert summary["total"] == 19 and summary["skipped"] == 1


def refuse_hard_links(monkeypatch) -> None:
    def refuse(*_args):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", refuse)


def test_split_copies_where_hard_links_are_refused(tmp_path: Path, monkeypatch) -> None:
    source = tmp_path / "a.jpg"
    source.write_bytes(b"jpeg bytes")

    refuse_hard_links(monkeypatch)
    link_or_copy(source, tmp_path / "b.jpg")
    assert (tmp_path / "b.jpg").read_bytes() == b"jpeg bytes"
    assert not (tmp_path / "b.jpg").samefile(source)


def test_many_images_are_checked_in_processes_with_the_same_verdicts(tmp_path: Path) -> None:
    from devtools.fakes import jpeg_bytes, photo

    good = jpeg_bytes(photo(0, 1))
    images = []
    for index in range(300):  # past the size where the check moves to a process pool
        path = tmp_path / f"cat.{index}.jpg"
        path.write_bytes(good if index % 3 else b"")
        images.append(LabeledImage(path, 0))
    pooled = check_images(images, workers=2)
    assert [v.image for v in pooled] == images  # in order
    assert [v.problem for v in pooled] == [None if i % 3 else "empty file" for i in range(300)]


def test_names_that_differ_only_in_case_stay_two_files(tmp_path: Path) -> None:
    for name, data in (("a/Cat.1.jpg", b"first"), ("b/cat.1.jpg", b"second")):
        (tmp_path / name).parent.mkdir()
        (tmp_path / name).write_bytes(data)
    images = [LabeledImage(tmp_path / "a/Cat.1.jpg", 0), LabeledImage(tmp_path / "b/cat.1.jpg", 0)]
    write_split({"train": images}, set(), tmp_path / "split")
    written = sorted((tmp_path / "split/train/cats").iterdir())
    assert [p.name for p in written] == ["Cat.1.jpg", "cat.1-1.jpg"]
    assert {p.read_bytes() for p in written} == {b"first", b"second"}


def test_a_copy_never_replaces_an_existing_file(tmp_path: Path, monkeypatch) -> None:
    source, existing = tmp_path / "a.jpg", tmp_path / "b.jpg"
    source.write_bytes(b"new")
    existing.write_bytes(b"kept")
    with pytest.raises(FileExistsError):
        link_or_copy(source, existing)

    refuse_hard_links(monkeypatch)
    with pytest.raises(FileExistsError):
        link_or_copy(source, existing)
    assert existing.read_bytes() == b"kept"


def bad_image_corpus(folder: Path) -> dict[str, str | None]:
    """Writes images of every troublesome kind; returns file name -> expected skip reason."""
    import io

    from PIL import Image

    from devtools.fakes import jpeg_bytes, photo

    def encoded(image: Image.Image, fmt: str) -> bytes:
        out = io.BytesIO()
        image.save(out, format=fmt)
        return out.getvalue()

    corpus = {
        "cat.900.jpg": (b"", "empty file"),
        "cat.901.jpg": (jpeg_bytes(photo(0, 901))[:200], "corrupt image"),
        "cat.902.jpg": (b"<html>404 Not Found</html>", "not a readable image"),
        "cat.903.jpg": (encoded(Image.new("L", (9000, 6000)), "PNG"), "too many pixels"),
        "cat.904.jpg": (jpeg_bytes(Image.new("RGB", (3, 3))), "too small"),
        "dog.900.jpg": (encoded(photo(1, 900), "PNG"), None),
        "dog.901.jpg": (encoded(photo(1, 901), "GIF"), None),
        "dog.902.jpg": (encoded(photo(1, 902), "BMP"), None),
        "dog.903.jpg": (encoded(photo(1, 903).convert("CMYK"), "JPEG"), None),
        "dog.904.jpg": (jpeg_bytes(photo(1, 904).convert("L")), None),
    }
    for name, (data, _) in corpus.items():
        (folder / name).write_bytes(data)
    return {name: reason for name, (_, reason) in corpus.items()}


def test_bad_images_in_real_looking_data_are_reported_and_raw_stays_intact(
    stage_workspace, tmp_path
) -> None:
    import hashlib
    import json

    from mlflow.tracking import MlflowClient

    from pipeline import download, split, tracking
    from tests.conftest import set_params

    source = tmp_path / "messy"
    write_kaggle_tree(source, per_class=12)
    expected = bad_image_corpus(source / "train")
    set_params(stage_workspace, "download", local_path=str(source))
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in source.rglob("*.jpg")}

    download.main()
    split.main()

    skipped = list(csv.DictReader((stage_workspace / "reports/split/skipped.csv").open()))
    reasons = {Path(row["file"]).name: row["reason"] for row in skipped}
    bad = {name: reason for name, reason in expected.items() if reason}
    assert set(reasons) == set(bad)
    for name, reason in bad.items():
        assert reasons[name].startswith(reason)
    summary = json.loads((stage_workspace / "reports/split/summary.json").read_text())
    assert summary["skipped"] == 5 and summary["reencoded"] == 4
    assert summary["total"] == 24 + 5
    assert {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in source.rglob("*.jpg")} == before
    raw = stage_workspace / "data/raw/train"
    assert len(list(raw.glob("*.jpg"))) == 34  # the raw copy keeps the bad files too
    run = MlflowClient(tracking.tracking_uri()).search_runs(
        [
            MlflowClient(tracking.tracking_uri())
            .get_experiment_by_name("dogs-vs-cats")
            .experiment_id
        ],
        filter_string="tags.`pipeline.stage` = 'split'",
    )[0]
    assert run.data.metrics["data/images_skipped"] == 5


def test_a_failure_before_the_reports_are_written_keeps_the_previous_split_whole(
    stage_workspace: Path, monkeypatch
) -> None:
    from pipeline import split

    write_kaggle_tree(stage_workspace / "data/raw", per_class=8)
    split.main()
    outputs = (stage_workspace / "data/split", stage_workspace / "reports/split")
    before = snapshot(*outputs)

    def fail(*_args):
        raise OSError("disk full")

    set_params(stage_workspace, "common", seed=7)  # a different split if it went through
    monkeypatch.setattr(split, "write_skipped", fail)
    with pytest.raises(OSError, match="disk full"):
        split.main()
    assert snapshot(*outputs) == before


def test_data_made_only_of_decompression_bombs_is_refused_for_what_it_is(
    stage_workspace: Path,
) -> None:
    from pipeline import split
    from tests.test_images import png_header

    raw = stage_workspace / "data/raw/train"
    raw.mkdir(parents=True)
    for name in ("cat", "dog"):
        for i in range(4):
            (raw / f"{name}.{i}.jpg").write_bytes(png_header(60000, 60000))

    with pytest.raises(BadInputError) as error:
        split.main()

    message = str(error.value)
    assert "\n" not in message
    assert "8 of 8 images are unusable" in message
    assert "too many pixels: 60000x60000, limit" in message
