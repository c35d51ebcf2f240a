from __future__ import annotations

import hashlib
import json
import os
import shutil
import tarfile
from pathlib import Path

import pytest

from devtools.fakes import write_kaggle_tree
from pipeline import download
from pipeline.archives import ArchiveError
from pipeline.config import DownloadConfig, FileCheck, MirrorConfig
from pipeline.download import (
    DownloadError,
    acquire,
    detect_layout,
    fetch_http,
    fetch_kaggle,
    populate_raw,
)
from tests.conftest import set_params, write_petimages_tree
from tests.http_fixture import Served, serve


def mirror(url: str, payload: bytes, **overrides) -> MirrorConfig:
    values = {"url": url, "size": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}
    return MirrorConfig(**{**values, **overrides})


def test_local_kaggle_zip_is_extracted_and_detected(tmp_path: Path, kaggle_zip: Path) -> None:
    raw = tmp_path / "raw"
    raw.mkdir()
    before = kaggle_zip.read_bytes()
    populate_raw(kaggle_zip, raw)
    summary = detect_layout(raw)
    assert summary.layout == "kaggle"
    assert summary.per_class == {"cats": 12, "dogs": 12}
    assert kaggle_zip.read_bytes() == before


def test_local_petimages_folder_and_tarball(tmp_path: Path) -> None:
    source = tmp_path / "src"
    write_petimages_tree(source, per_class=5)
    (source / "PetImages" / "Cat" / "Thumbs.db").write_bytes(b"junk")
    raw = tmp_path / "raw"
    raw.mkdir()
    populate_raw(source, raw)
    assert detect_layout(raw).layout == "petimages"
    assert (source / "PetImages" / "Cat" / "Thumbs.db").exists()

    tarball = tmp_path / "pets.tar.gz"
    with tarfile.open(tarball, "w:gz") as tf:
        tf.add(source / "PetImages", arcname="PetImages")
    raw2 = tmp_path / "raw2"
    raw2.mkdir()
    populate_raw(tarball, raw2)
    assert detect_layout(raw2).per_class == {"cats": 5, "dogs": 5}


def test_unknown_layouts_are_refused_with_the_expected_ones(tmp_path: Path) -> None:
    source = tmp_path / "photos"
    source.mkdir()
    (source / "holiday.jpg").write_bytes(b"x")
    with pytest.raises(DownloadError, match="Expected one of these layouts"):
        detect_layout(source)
    with pytest.raises(DownloadError, match=r"not a folder or a \.zip"):
        populate_raw(tmp_path / "notes.txt", tmp_path)


def test_relative_local_path_resolves_against_the_repository(tmp_path, monkeypatch, kaggle_zip):
    # DVC runs a queued experiment's stages in a copy under .dvc/tmp/exps, where the
    # user's untracked archive is not: the path is the repository's, not the current folder's.
    temp_copy = kaggle_zip.parent / ".dvc/tmp/exps/tmpabc"
    temp_copy.mkdir(parents=True)
    monkeypatch.chdir(temp_copy)
    monkeypatch.setenv("DVC_ROOT", str(kaggle_zip.parent))
    cfg = DownloadConfig(
        source="local",
        local_path=Path(kaggle_zip.name),
        kaggle_competition="dogs-vs-cats",
        petimages=mirror("http://127.0.0.1/x.zip", b"unused"),
    )
    assert acquire(cfg, tmp_path / "data/raw") == kaggle_zip
    missing = cfg.model_copy(update={"local_path": Path("nope.zip")})
    with pytest.raises(DownloadError, match="does not exist"):
        acquire(missing, tmp_path / "data/raw")


def test_a_local_folder_that_holds_the_raw_output_is_refused(tmp_path, kaggle_zip):
    raw = tmp_path / "repo/data/raw"
    raw.mkdir(parents=True)
    for holder in (tmp_path / "repo", tmp_path / "repo/data", raw):
        cfg = DownloadConfig(
            source="local",
            local_path=holder,
            kaggle_competition="dogs-vs-cats",
            petimages=mirror("http://127.0.0.1/x.zip", b"unused"),
        )
        with pytest.raises(DownloadError, match=r"holds paths\.raw"):
            acquire(cfg, raw)


def test_a_mirror_url_without_a_file_name_downloads_to_a_named_file(tmp_path, kaggle_zip):
    payload = kaggle_zip.read_bytes()
    raw = tmp_path / "data/raw"
    with serve(Served(payload)) as url:
        root = url.rsplit("/", 1)[0] + "/"
        cfg = DownloadConfig(
            source="petimages",
            kaggle_competition="dogs-vs-cats",
            petimages=mirror(root, payload),
        )
        assert acquire(cfg, raw) == tmp_path / "data/.downloads/petimages.zip"


def test_http_download_verifies_and_moves_into_place(tmp_path: Path, kaggle_zip: Path) -> None:
    payload = kaggle_zip.read_bytes()
    served = Served(payload)
    target = tmp_path / "archive.zip"
    with serve(served) as url:
        assert fetch_http(mirror(url, payload), target) == target
        assert target.read_bytes() == payload
        fetch_http(mirror(url, payload), target)
    assert len(served.requests) == 1  # an intact earlier download is not fetched again


def test_http_download_resumes_after_a_cut(tmp_path: Path) -> None:
    payload = bytes(range(256)) * 2048  # 512 KiB
    served = Served(payload, cut_after=300_000)
    target = tmp_path / "archive.zip"
    with serve(served) as url:
        with pytest.raises(DownloadError, match="run the stage again to resume"):
            fetch_http(mirror(url, payload), target)
        assert not target.exists()
        fetch_http(mirror(url, payload), target)
    assert target.read_bytes() == payload
    resumed_from = int(served.requests[-1]["Range"].removeprefix("bytes=").rstrip("-"))
    assert 0 < resumed_from <= 300_000


def test_http_download_starts_over_when_the_server_ignores_the_range(tmp_path: Path) -> None:
    payload = bytes(range(256)) * 2048
    served = Served(payload, support_ranges=False, cut_after=300_000)
    target = tmp_path / "archive.zip"
    unpinned = {"size": None, "sha256": None}  # only the restart keeps the bytes right
    with serve(served) as url:
        with pytest.raises(DownloadError):
            fetch_http(mirror(url, payload, **unpinned), target)
        fetch_http(mirror(url, payload, **unpinned), target)
    assert "Range" in served.requests[-1] and target.read_bytes() == payload


def test_http_download_of_a_complete_part_only_checks_it(tmp_path: Path) -> None:
    payload = b"all of it" * 100
    served = Served(payload)
    target = tmp_path / "archive.zip"
    (tmp_path / "archive.zip.part").write_bytes(payload)
    with serve(served) as url:  # answers 416: nothing left in the requested range
        fetch_http(mirror(url, payload), target)
    assert target.read_bytes() == payload and len(served.requests) == 1


def test_http_size_mismatch_says_so_and_leaves_nothing_behind(tmp_path: Path) -> None:
    payload = b"shorter than pinned"
    target = tmp_path / "archive.zip"
    with serve(Served(payload)) as url, pytest.raises(DownloadError, match="expected 100"):
        fetch_http(mirror(url, payload, size=100, sha256=None), target)
    assert list(tmp_path.glob("archive.zip*")) == []


def test_http_checksum_mismatch_leaves_nothing_behind(tmp_path: Path, kaggle_zip: Path) -> None:
    payload = kaggle_zip.read_bytes()
    target = tmp_path / "archive.zip"
    with serve(Served(payload)) as url, pytest.raises(DownloadError, match="SHA-256"):
        fetch_http(mirror(url, payload, sha256="0" * 64), target)
    assert list(tmp_path.glob("archive.zip*")) == []


def test_http_404_says_what_failed(tmp_path: Path) -> None:
    with serve(Served(b"", status=404)) as url, pytest.raises(DownloadError, match="404"):
        fetch_http(mirror(url, b"abc"), tmp_path / "archive.zip")


def test_a_server_that_stops_answering_times_out(tmp_path: Path) -> None:
    served = Served(b"x" * 1000, stall_seconds=3)
    with serve(served) as url, pytest.raises(DownloadError, match="timed out"):
        fetch_http(mirror(url, served.payload), tmp_path / "archive.zip", timeout=0.5)


def kaggle_failure(status: int | None = None, error: type[Exception] | None = None):
    import requests
    from kagglehub import exceptions

    def download(handle: str, *args, **kwargs) -> str:
        if error is not None:
            raise error("User is not authenticated")
        response = requests.Response()
        response.status_code = status
        raise exceptions.KaggleApiHTTPError(f"{status} Client Error", response=response)

    return download


@pytest.mark.parametrize(
    ("failure", "expected"),
    [
        (
            kaggle_failure(error=__import__("kagglehub").exceptions.UnauthenticatedError),
            "kaggle.json",
        ),
        (kaggle_failure(status=401), "did not accept your credentials"),
        (kaggle_failure(status=403), "rules have not been accepted"),
        (kaggle_failure(status=404), "has no competition"),
    ],
    ids=["no-credentials", "bad-credentials", "rules-not-accepted", "unknown-competition"],
)
def test_kaggle_failures_say_what_to_do(monkeypatch, failure, expected) -> None:
    import kagglehub

    monkeypatch.setattr(kagglehub, "competition_download", failure)
    with pytest.raises(DownloadError, match=expected):
        fetch_kaggle("dogs-vs-cats")


def test_kaggle_download_is_unpacked_like_a_local_copy(tmp_path, monkeypatch, kaggle_zip) -> None:
    import kagglehub

    competition = tmp_path / "kagglehub-cache"
    competition.mkdir()
    shutil.copy(kaggle_zip, competition / "train.zip")
    monkeypatch.setattr(kagglehub, "competition_download", lambda handle, **kw: str(competition))
    raw = tmp_path / "raw"
    raw.mkdir()
    populate_raw(fetch_kaggle("dogs-vs-cats"), raw)
    assert detect_layout(raw).per_class == {"cats": 12, "dogs": 12}


def test_kaggle_credentials_never_reach_logs_or_mlflow(stage_workspace, monkeypatch, capsys):
    import kagglehub

    secret = "planted-secret-3f9c2a"
    monkeypatch.setenv("KAGGLE_USERNAME", "someone")
    monkeypatch.setenv("KAGGLE_KEY", secret)
    monkeypatch.setattr(kagglehub, "competition_download", kaggle_failure(status=403))
    set_params(stage_workspace, "download", source="kaggle")

    with pytest.raises(DownloadError) as error:
        download.main()

    assert "rules have not been accepted" in str(error.value)
    printed = capsys.readouterr()
    assert secret not in printed.out + printed.err + str(error.value)
    stored = [p for p in stage_workspace.rglob("*") if p.is_file()]
    assert any(p.name == "mlflow.db" for p in stored)
    for path in stored:
        assert secret.encode() not in path.read_bytes(), path


def test_a_corrupt_archive_exits_clearly_and_keeps_the_previous_raw_data(
    stage_workspace, kaggle_zip
):
    download.main()
    before = sorted(
        p.relative_to(stage_workspace) for p in (stage_workspace / "data/raw").rglob("*")
    )
    corrupt = stage_workspace.parent / "cut.zip"
    corrupt.write_bytes(kaggle_zip.read_bytes()[:-100])
    set_params(stage_workspace, "download", local_path=str(corrupt))

    with pytest.raises(ArchiveError) as error:
        download.main()

    assert str(error.value).startswith("cannot extract cut.zip")
    after = sorted(
        p.relative_to(stage_workspace) for p in (stage_workspace / "data/raw").rglob("*")
    )
    assert after == before and before


def test_links_in_a_local_folder_are_skipped_and_nothing_outside_is_read(tmp_path: Path) -> None:
    source = tmp_path / "src"
    write_kaggle_tree(source, per_class=3)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("planted-secret")
    (outside / "dog.7.jpg").write_bytes(b"outside image")
    (source / "train" / "cat.999.jpg").symlink_to(outside / "secret.txt")
    (source / "train" / "etc").symlink_to(outside, target_is_directory=True)
    (source / "train" / "dog.0-copy.jpg").symlink_to(source / "train" / "dog.0.jpg")
    os.mkfifo(source / "train" / "cat.998.jpg")  # reading it would wait forever
    raw = tmp_path / "raw"
    raw.mkdir()

    skipped = populate_raw(source, raw)

    reasons = {path.relative_to(source).as_posix(): reason for path, reason in skipped}
    assert reasons.pop("train/cat.998.jpg") == "not a regular file (a FIFO, socket or device)"
    assert sorted(reasons) == ["train/cat.999.jpg", "train/dog.0-copy.jpg", "train/etc"]
    assert all("link" in reason and "\n" not in reason for reason in reasons.values())
    copied = sorted(p.relative_to(raw).as_posix() for p in raw.rglob("*"))
    images = sorted(f"train/{name}.{i}.jpg" for name in ("cat", "dog") for i in range(3))
    assert copied == ["train", *images]
    assert not any(p.is_symlink() for p in raw.rglob("*"))
    assert all(b"planted-secret" not in p.read_bytes() for p in raw.rglob("*") if p.is_file())
    assert detect_layout(raw).per_class == {"cats": 3, "dogs": 3}


def test_the_download_stage_names_each_skipped_link_on_one_line(
    stage_workspace, tmp_path, capsys
) -> None:
    source = tmp_path / "folder"
    write_kaggle_tree(source, per_class=3)
    (source / "train" / "cat.999.jpg").symlink_to("/etc/passwd")
    set_params(stage_workspace, "download", local_path=str(source))

    download.main()

    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "cat.999.jpg" in line]
    assert lines == [
        f"download: skipped {source / 'train' / 'cat.999.jpg'}: a link to /etc/passwd; "
        "only regular files inside the folder are copied"
    ]
    raw = stage_workspace / "data/raw"
    assert not (raw / "train" / "cat.999.jpg").exists()
    summary = json.loads((stage_workspace / "reports/download/summary.json").read_text())
    assert summary["skipped"] == 1


def fake_kaggle(tmp_path: Path, deliveries: list[bytes], calls: list[dict]):
    """A `kagglehub.competition_download` whose cache holds `deliveries[0]` as train.zip, and
    a fresh download (`force_download=True`) the next one."""

    def download(handle: str, **kwargs) -> str:
        calls.append(kwargs)
        if kwargs.get("force_download") or not calls[:-1]:
            folder = tmp_path / f"kagglehub-{len(calls)}"
            folder.mkdir()
            (folder / "train.zip").write_bytes(deliveries[min(len(calls), len(deliveries)) - 1])
        return str(tmp_path / f"kagglehub-{len(calls)}")

    return download


def test_a_kaggle_file_unlike_its_pin_is_downloaded_again_once(tmp_path, monkeypatch) -> None:
    import kagglehub

    good = b"PK" + bytes(range(256)) * 4
    calls: list[dict] = []
    monkeypatch.setattr(
        kagglehub, "competition_download", fake_kaggle(tmp_path, [good[:-9], good], calls)
    )
    check = FileCheck(size=len(good), sha256=hashlib.sha256(good).hexdigest())

    folder = fetch_kaggle("dogs-vs-cats", check)

    assert (folder / "train.zip").read_bytes() == good
    assert [bool(c.get("force_download")) for c in calls] == [False, True]


@pytest.mark.parametrize(
    ("delivered", "expected"),
    [
        (
            b"short",
            r"Kaggle's train\.zip has 5 bytes, expected 1024 \(download\.kaggle_train\.size\)",
        ),
        (
            b"x" * 1024,
            r"Kaggle's train\.zip has SHA-256 [0-9a-f]{64}, expected 0{64} "
            r"\(download\.kaggle_train\.sha256\)",
        ),
    ],
    ids=["size", "sha256"],
)
def test_a_kaggle_file_unlike_its_pin_twice_is_refused(
    tmp_path, monkeypatch, delivered, expected
) -> None:
    import kagglehub

    monkeypatch.setattr(
        kagglehub, "competition_download", fake_kaggle(tmp_path, [delivered], calls=[])
    )
    with pytest.raises(DownloadError, match=expected) as error:
        fetch_kaggle("dogs-vs-cats", FileCheck(size=1024, sha256="0" * 64))
    assert "\n" not in str(error.value)


def test_a_kaggle_transfer_failing_its_checksum_says_so(monkeypatch) -> None:
    import kagglehub
    from kagglehub.exceptions import DataCorruptionError

    def corrupt(handle: str, **kwargs) -> str:
        raise DataCorruptionError("checksum mismatch")

    monkeypatch.setattr(kagglehub, "competition_download", corrupt)
    with pytest.raises(DownloadError, match="did not match Kaggle's checksum"):
        fetch_kaggle("dogs-vs-cats", FileCheck())


def test_the_kaggle_train_zip_size_and_sha256_are_reported_to_pin(
    stage_workspace, tmp_path, monkeypatch, kaggle_zip
) -> None:
    import kagglehub

    competition = tmp_path / "kagglehub-cache"
    competition.mkdir()
    shutil.copy(kaggle_zip, competition / "train.zip")
    monkeypatch.setattr(kagglehub, "competition_download", lambda handle, **kw: str(competition))
    set_params(stage_workspace, "download", source="kaggle")

    download.main()

    summary = json.loads((stage_workspace / "reports/download/summary.json").read_text())
    payload = kaggle_zip.read_bytes()
    assert summary["kaggle_train"] == {
        "size": len(payload),
        "sha256": hashlib.sha256(payload).hexdigest(),
    }
    # Pinned as reported, the same download passes the check.
    set_params(stage_workspace, "download", kaggle_train=summary["kaggle_train"])
    download.main()
