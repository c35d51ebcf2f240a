from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from devtools.fakes import jpeg_bytes, photo
from pipeline.images import (
    MAX_IMAGE_PIXELS,
    find_labeled_images,
    inspect_image,
    label_of,
    list_split,
    reencode_as_jpeg,
)


@pytest.mark.parametrize(
    ("path", "label"),
    [
        ("train/cat.12.jpg", 0),
        ("train/dog.7.jpg", 1),
        ("PetImages/Cat/12.jpg", 0),
        ("PetImages/Dog/3.jpg", 1),
        ("data/split/train/cats/cat.1.jpg", 0),
        ("data/split/train/dogs/x.jpg", 1),
        ("test1/123.jpg", None),
        ("train/catalog.jpg", None),
    ],
)
def test_labels_come_from_folder_or_file_name(path: str, label: int | None) -> None:
    assert label_of(Path(path)) == label


def test_find_labeled_images_separates_unlabeled(tmp_path: Path) -> None:
    for name in ("train/cat.1.jpg", "train/dog.1.jpg", "test1/5.jpg", "PetImages/Cat/Thumbs.db"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    labeled, unlabeled = find_labeled_images(tmp_path)
    assert [(i.path.name, i.label) for i in labeled] == [("cat.1.jpg", 0), ("dog.1.jpg", 1)]
    assert [p.name for p in unlabeled] == ["5.jpg"]


def encoded(image: Image.Image, fmt: str, **args) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **args)
    return out.getvalue()


def test_a_plain_jpeg_passes_unchanged() -> None:
    assert inspect_image(jpeg_bytes(photo(0, 1))) == (None, False)
    assert inspect_image(jpeg_bytes(photo(0, 1).convert("L"))) == (None, False)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty file"),
        (b"<html>not found</html>", "not a readable image"),
        (jpeg_bytes(photo(1, 2))[:300], "corrupt image"),
        (jpeg_bytes(Image.new("RGB", (4, 4))), "too small"),
    ],
)
def test_unusable_images_get_a_reason(data: bytes, reason: str) -> None:
    problem, _ = inspect_image(data)
    assert problem is not None and problem.startswith(reason)


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares `width` x `height` pixels and holds almost none: a bomb's header."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body)
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize(
    ("data", "size"),
    [
        (encoded(Image.new("L", (8000, 6000)), "PNG"), "8000x6000"),
        (png_header(60000, 60000), "60000x60000"),  # past Pillow's own bomb limit
        (png_header(20000, 10000), "20000x10000"),  # past Pillow's warning, under its error
    ],
    ids=["real-48-megapixels", "declared-3.6-gigapixels", "declared-200-megapixels"],
)
def test_decompression_bombs_are_named_with_their_size(data: bytes, size: str) -> None:
    pillow_limit = Image.MAX_IMAGE_PIXELS
    problem, _ = inspect_image(data)
    assert problem == f"too many pixels: {size}, limit {MAX_IMAGE_PIXELS}"
    assert pillow_limit == Image.MAX_IMAGE_PIXELS  # Pillow's own check is back on for others


@pytest.mark.parametrize(
    "image_bytes",
    [
        encoded(photo(0, 3), "PNG"),
        encoded(photo(0, 3), "GIF"),
        encoded(photo(0, 3), "BMP"),
        encoded(photo(0, 3).convert("CMYK"), "JPEG"),
        encoded(photo(0, 3).convert("RGBA"), "PNG"),
    ],
    ids=["png", "gif", "bmp", "cmyk-jpeg", "rgba-png"],
)
def test_other_formats_are_flagged_and_reencode_to_rgb_jpeg(image_bytes: bytes) -> None:
    assert inspect_image(image_bytes) == (None, True)
    fixed = reencode_as_jpeg(image_bytes)
    assert inspect_image(fixed) == (None, False)
    with Image.open(io.BytesIO(fixed)) as image:
        assert image.format == "JPEG" and image.mode == "RGB"
        assert np.asarray(image).shape == (40, 48, 3)


def test_list_split_labels_by_class_folder(tmp_path: Path) -> None:
    for name in ("cats/a.jpg", "cats/b.jpg", "dogs/c.jpg"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    assert [(i.path.name, i.label) for i in list_split(tmp_path)] == [
        ("a.jpg", 0),
        ("b.jpg", 0),
        ("c.jpg", 1),
    ]
