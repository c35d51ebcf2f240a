from __future__ import annotations

import io
import re
import tarfile
import zipfile
from pathlib import Path

import pytest

from pipeline.archives import ArchiveError, Limits, UnsafeArchiveError, extract, extract_nested


def make_zip(path: Path, entries: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return path


def make_tar(path: Path, members: list[tarfile.TarInfo], data: bytes = b"") -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for member in members:
            tf.addfile(member, io.BytesIO(data) if member.isfile() else None)
    return path


def test_zip_and_tar_extract_into_target(tmp_path: Path) -> None:
    archive = make_zip(tmp_path / "a.zip", {"train/cat.1.jpg": b"1", "train/dog.1.jpg": b"2"})
    assert extract(archive, tmp_path / "z") == 2
    assert (tmp_path / "z/train/dog.1.jpg").read_bytes() == b"2"
    info = tarfile.TarInfo("PetImages/Cat/1.jpg")
    info.size = 3
    make_tar(tmp_path / "a.tar.gz", [info], b"abc")
    extract(tmp_path / "a.tar.gz", tmp_path / "t")
    assert (tmp_path / "t/PetImages/Cat/1.jpg").read_bytes() == b"abc"


ESCAPING_NAMES = [
    "../escape.jpg",
    "train/../../escape.jpg",
    "/abs/escape.jpg",
    "..\\escape.jpg",
    "C:/escape.jpg",
]


@pytest.mark.parametrize("name", ESCAPING_NAMES)
def test_zip_entries_leaving_the_target_are_refused(tmp_path: Path, name: str) -> None:
    archive = make_zip(tmp_path / "evil.zip", {name: b"x"})
    with pytest.raises(UnsafeArchiveError):
        extract(archive, tmp_path / "out")
    assert not list(tmp_path.rglob("*escape.jpg"))


@pytest.mark.parametrize("name", ESCAPING_NAMES)
def test_tar_entries_leaving_the_target_are_refused(tmp_path: Path, name: str) -> None:
    info = tarfile.TarInfo(name)
    info.size = 1
    archive = make_tar(tmp_path / "evil.tar.gz", [info], b"x")
    with pytest.raises(UnsafeArchiveError):
        extract(archive, tmp_path / "out")
    assert not list(tmp_path.rglob("*escape.jpg"))


def test_tar_links_and_devices_are_refused(tmp_path: Path) -> None:
    link = tarfile.TarInfo("train/cat.1.jpg")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    with pytest.raises(UnsafeArchiveError, match="link or special"):
        extract(make_tar(tmp_path / "link.tar.gz", [link]), tmp_path / "out")
    device = tarfile.TarInfo("dev")
    device.type = tarfile.CHRTYPE
    with pytest.raises(UnsafeArchiveError, match="link or special"):
        extract(make_tar(tmp_path / "dev.tar.gz", [device]), tmp_path / "out2")


def test_zip_symlink_entries_are_refused(tmp_path: Path) -> None:
    info = zipfile.ZipInfo("train/cat.1.jpg")
    info.external_attr = 0o120777 << 16
    with zipfile.ZipFile(tmp_path / "l.zip", "w") as zf:
        zf.writestr(info, "/etc/passwd")
    with pytest.raises(UnsafeArchiveError):
        extract(tmp_path / "l.zip", tmp_path / "out")


def test_entry_count_and_size_are_bounded(tmp_path: Path) -> None:
    archive = make_zip(tmp_path / "many.zip", {f"f{i}.jpg": b"x" * 100 for i in range(5)})
    with pytest.raises(UnsafeArchiveError, match="more than 4 entries"):
        extract(archive, tmp_path / "a", Limits(max_entries=4))
    with pytest.raises(UnsafeArchiveError, match="more than"):
        extract(archive, tmp_path / "b", Limits(max_total_bytes=300))


def test_kaggle_zip_inside_zip_is_unpacked_once(tmp_path: Path) -> None:
    inner = make_zip(tmp_path / "train.zip", {"train/cat.1.jpg": b"c", "train/dog.1.jpg": b"d"})
    outer = make_zip(tmp_path / "dogs-vs-cats.zip", {"train.zip": inner.read_bytes()})
    target = tmp_path / "raw"
    extract(outer, target)
    extract_nested(target)
    assert sorted(p.relative_to(target).as_posix() for p in target.rglob("*.jpg")) == [
        "train/cat.1.jpg",
        "train/dog.1.jpg",
    ]
    assert inner.exists()  # the user's own file is untouched


def jpgs(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*.jpg"))


def extracted_beside_train_zip(tmp_path: Path, entries: dict, inner: dict) -> Path:
    """An outer zip of `entries` and a `train.zip` of `inner`, extracted (not nested yet)."""
    train_zip = make_zip(tmp_path / "train.zip", inner)
    outer = make_zip(tmp_path / "outer.zip", {**entries, "train.zip": train_zip.read_bytes()})
    extract(outer, tmp_path / "raw")
    return tmp_path / "raw"


def test_an_inner_archive_merges_into_a_folder_of_its_name(tmp_path: Path) -> None:
    target = extracted_beside_train_zip(tmp_path, {"train/cat.1.jpg": b"c"}, {"dog.1.jpg": b"d"})
    extract_nested(target)
    assert jpgs(target) == ["train/cat.1.jpg", "train/dog.1.jpg"]  # nothing replaced


def test_an_inner_archive_never_overwrites_a_file(tmp_path: Path) -> None:
    target = extracted_beside_train_zip(
        tmp_path, {"train/cat.1.jpg": b"old"}, {"cat.1.jpg": b"new"}
    )
    with pytest.raises(ArchiveError, match="would replace"):
        extract_nested(target)
    assert (target / "train/cat.1.jpg").read_bytes() == b"old"


def test_empty_and_dot_named_inner_archives_unpack(tmp_path: Path) -> None:
    empty = make_zip(tmp_path / "empty.zip", {})
    hidden = make_zip(tmp_path / ".cache.zip", {"cat.2.jpg": b"c"})
    outer = make_zip(
        tmp_path / "outer.zip", {"empty.zip": empty.read_bytes(), ".cache.zip": hidden.read_bytes()}
    )
    target = tmp_path / "raw"
    extract(outer, target)
    extract_nested(target)
    assert (target / "empty").is_dir() and jpgs(target) == [".cache/cat.2.jpg"]


def test_inner_archives_share_the_limits_of_the_whole_tree(tmp_path: Path) -> None:
    inner = make_zip(tmp_path / "train.zip", {"cat.1.jpg": b"x" * 200})
    outer = make_zip(tmp_path / "outer.zip", {"a.bin": b"y" * 200, "train.zip": inner.read_bytes()})
    target = tmp_path / "raw"
    extract(outer, target)  # 200 bytes + the inner zip: within 600
    with pytest.raises(UnsafeArchiveError, match="more than"):
        extract_nested(target, Limits(max_total_bytes=600))


@pytest.mark.parametrize(
    "damage",
    ["truncated zip", "flipped header byte", "truncated tar.gz", "file then folder of one name"],
)
def test_broken_archives_raise_one_clear_error(tmp_path: Path, damage: str) -> None:
    good = make_zip(tmp_path / "good.zip", {"train/cat.1.jpg": b"c" * 5000})
    data = good.read_bytes()
    if damage == "truncated zip":
        broken = tmp_path / "broken.zip"
        broken.write_bytes(data[:-30])
    elif damage == "flipped header byte":
        broken = tmp_path / "broken.zip"
        at = data.index(b"train/cat.1.jpg")  # the local header's name
        broken.write_bytes(data[:at] + b"T" + data[at + 1 :])
    elif damage == "truncated tar.gz":
        info = tarfile.TarInfo("PetImages/Cat/1.jpg")
        info.size = 5000
        whole = make_tar(tmp_path / "whole.tar.gz", [info], bytes(range(250)) * 20).read_bytes()
        broken = tmp_path / "broken.tar.gz"
        broken.write_bytes(whole[: len(whole) // 2])
    else:
        broken = make_zip(
            tmp_path / "broken.zip", {"train/cat.1.jpg": b"c", "train/cat.1.jpg/x.jpg": b"d"}
        )
    with pytest.raises(ArchiveError, match=re.escape(broken.name)):
        extract(broken, tmp_path / "out")


def test_non_archives_are_rejected(tmp_path: Path) -> None:
    (tmp_path / "x.zip").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="neither a zip nor a tar"):
        extract(tmp_path / "x.zip", tmp_path / "out")


def zip_of_zeros(path: Path, name: str, size: int) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(name, bytes(size))
    return path


def test_a_zip_bomb_is_refused_by_its_ratio_before_anything_is_written(tmp_path: Path) -> None:
    bomb = zip_of_zeros(tmp_path / "bomb.zip", "train/cat.1.jpg", 64 * 1024**2)
    assert bomb.stat().st_size < 100 * 1024  # 64 MiB of zeros deflate to about 64 KiB
    with pytest.raises(UnsafeArchiveError) as refused:
        extract(bomb, tmp_path / "out")
    message = str(refused.value)
    assert "\n" not in message
    assert re.search(r"'train/cat\.1\.jpg': it expands \d+x", message), message
    assert not list((tmp_path / "out").rglob("*.jpg"))


def test_one_entry_larger_than_the_entry_limit_is_refused(tmp_path: Path) -> None:
    archive = make_zip(tmp_path / "big.zip", {"train/cat.1.jpg": bytes(range(256)) * 8})
    with pytest.raises(UnsafeArchiveError, match=r"'train/cat\.1\.jpg': .* more than 1000 bytes"):
        extract(archive, tmp_path / "out", Limits(max_entry_bytes=1000))


def zip_of_zeros_claiming(path: Path, actual: int, field: str, claimed: int) -> Path:
    """A zip of `actual` zero bytes whose headers claim its `field` ("compressed" or "size")
    is `claimed`: a harmless-looking ratio, or an entry smaller than it is."""
    import struct

    zip_of_zeros(path, "train/cat.1.jpg", actual)
    data = bytearray(path.read_bytes())
    at = 0 if field == "compressed" else 4  # the uncompressed size follows the compressed one
    struct.pack_into("<I", data, data.index(b"PK\x03\x04") + 18 + at, claimed)  # local header
    struct.pack_into("<I", data, data.index(b"PK\x01\x02") + 20 + at, claimed)  # central dir
    path.write_bytes(bytes(data))
    return path


def test_a_zip_that_lies_about_its_compressed_size_is_still_a_bomb(tmp_path: Path) -> None:
    archive = zip_of_zeros_claiming(tmp_path / "liar.zip", 64 * 1024**2, "compressed", 2**31)
    with pytest.raises(UnsafeArchiveError, match=r"'train/cat\.1\.jpg': it expands \d+x"):
        extract(archive, tmp_path / "out")
    assert not list((tmp_path / "out").rglob("*.jpg"))


def test_a_tar_gz_bomb_is_refused_by_its_ratio(tmp_path: Path) -> None:
    info = tarfile.TarInfo("PetImages/Cat/1.jpg")
    info.size = 64 * 1024**2
    bomb = make_tar(tmp_path / "bomb.tar.gz", [info], bytes(info.size))
    with pytest.raises(UnsafeArchiveError, match=r"'PetImages/Cat/1\.jpg': it expands \d+x"):
        extract(bomb, tmp_path / "out")
    assert not list((tmp_path / "out").rglob("*.jpg"))


def test_real_photos_and_small_text_files_are_within_the_ratio(tmp_path: Path) -> None:
    from devtools.fakes import jpeg_bytes, photo

    entries = {f"train/cat.{i}.jpg": jpeg_bytes(photo(0, i)) for i in range(3)}
    entries["sampleSubmission.csv"] = b"id,label\n" + b"".join(b"%d,0\n" % i for i in range(12500))
    with zipfile.ZipFile(tmp_path / "ok.zip", "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    assert extract(tmp_path / "ok.zip", tmp_path / "out") == 4


def test_many_small_entries_that_expand_together_are_refused(tmp_path: Path) -> None:
    with zipfile.ZipFile(tmp_path / "many.zip", "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for i in range(40):
            zf.writestr(f"train/cat.{i}.jpg", bytes(512 * 1024))  # each under the ratio floor
    with pytest.raises(UnsafeArchiveError, match=r"refusing many\.zip: it expands \d+x"):
        extract(tmp_path / "many.zip", tmp_path / "out")


@pytest.mark.parametrize("kind", ["zip", "tar"])
def test_an_entry_named_with_a_nul_byte_is_refused_by_name(tmp_path: Path, kind: str) -> None:
    """Found by tests/test_fuzz.py: Python stops at such a name with a ValueError traceback
    (tar) or an IndexError (zip, which cuts the name at the NUL to '')."""
    archive = tmp_path / f"nul.{kind}"
    if kind == "zip":
        with zipfile.ZipFile(archive, "w") as zf:
            zf.writestr(zipfile.ZipInfo("\0cat.jpg"), b"x")  # its name reads back as empty
    else:
        with tarfile.open(archive, "w") as tf:
            info = tarfile.TarInfo("cat\0é.jpg")  # non-ASCII: a PAX header keeps the NUL
            info.size = 1
            tf.addfile(info, io.BytesIO(b"x"))
    with pytest.raises(UnsafeArchiveError, match="empty or with a NUL byte"):
        extract(archive, tmp_path / "out")


def test_a_zip_that_understates_an_entry_writes_no_more_than_it_declares(tmp_path: Path) -> None:
    archive = zip_of_zeros_claiming(tmp_path / "liar.zip", 64 * 1024**2, "size", 1000)
    with pytest.raises(ArchiveError, match=r"liar\.zip"):
        extract(archive, tmp_path / "out")
    written = [p.stat().st_size for p in (tmp_path / "out").rglob("*") if p.is_file()]
    assert all(size <= 1000 for size in written), written


def test_one_bad_entry_refuses_the_whole_archive_before_any_is_written(tmp_path: Path) -> None:
    for kind in ("zip", "tar"):
        entries = {"train/cat.1.jpg": b"c", "../escape.jpg": b"x"}
        if kind == "zip":
            archive = make_zip(tmp_path / "mixed.zip", entries)
        else:
            infos = [tarfile.TarInfo(name) for name in entries]
            for info in infos:
                info.size = 1
            archive = make_tar(tmp_path / "mixed.tar.gz", infos, b"c")
        with pytest.raises(UnsafeArchiveError, match="leaves the target"):
            extract(archive, tmp_path / kind)
        assert not [p for p in tmp_path.rglob("*.jpg")], kind


def test_links_inside_the_target_are_refused_too(tmp_path: Path) -> None:
    """A dataset is files and folders: a link would read one photo twice, or a folder loop."""
    photo_entry = tarfile.TarInfo("train/cat.1.jpg")
    photo_entry.size = 1
    link = tarfile.TarInfo("train/cat.2.jpg")
    link.type, link.linkname = tarfile.SYMTYPE, "cat.1.jpg"
    with pytest.raises(UnsafeArchiveError, match="link or special"):
        extract(make_tar(tmp_path / "l.tar.gz", [photo_entry, link], b"c"), tmp_path / "out")


def test_a_zip_made_on_windows_extracts_into_folders(tmp_path: Path) -> None:
    """Some Windows tools write `\\` between folder names; zipfile keeps it in the file name."""
    archive = make_zip(tmp_path / "win.zip", {"train\\cat.1.jpg": b"c", "train\\dog.1.jpg": b"d"})
    extract(archive, tmp_path / "out")
    assert jpgs(tmp_path / "out") == ["train/cat.1.jpg", "train/dog.1.jpg"]
