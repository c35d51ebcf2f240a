"""Finding, labelling, checking and loading images; shared by every stage that reads them.

Labels follow the folder or file name, whichever layout the images come in: Kaggle's
`train/cat.N.jpg`, PetImages' `Cat/N.jpg`, and this pipeline's own `<split>/cats/N.jpg`.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

CLASS_NAMES = ("cats", "dogs")  # index = label: 0 is a cat, 1 is a dog
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif"})
SPLITS = ("train", "validation", "test")

# Real photos in this dataset are under 1 megapixel; anything past this is a decompression
# bomb or a mislabelled scan, and decoding it would stall a worker.
MAX_IMAGE_PIXELS = 40_000_000

_FOLDER_LABELS = {"cat": 0, "cats": 0, "dog": 1, "dogs": 1}


@dataclass(frozen=True)
class LabeledImage:
    path: Path
    label: int


def label_of(path: Path) -> int | None:
    """0 for a cat, 1 for a dog, None when neither the folder nor the name says."""
    by_folder = _FOLDER_LABELS.get(path.parent.name.lower())
    if by_folder is not None:
        return by_folder
    prefix = path.name.split(".", 1)[0].lower()
    return _FOLDER_LABELS.get(prefix)


def label_of_probability(prob: float, threshold: float) -> str:
    """ "cat" or "dog", as `predict` and a served model name the answer for P(dog) `prob`."""
    return CLASS_NAMES[int(prob >= threshold)].removesuffix("s")


def is_image_name(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def find_images(root: Path) -> list[Path]:
    """Every file below `root` with an image suffix, sorted so results do not depend on the OS."""
    return sorted(path for path in root.rglob("*") if path.is_file() and is_image_name(path))


def find_labeled_images(root: Path) -> tuple[list[LabeledImage], list[Path]]:
    """Labelled images below `root`, and the image files whose label cannot be told."""
    labeled: list[LabeledImage] = []
    unlabeled: list[Path] = []
    for path in find_images(root):
        label = label_of(path)
        if label is None:
            unlabeled.append(path)
        else:
            labeled.append(LabeledImage(path, label))
    return labeled, unlabeled


@contextmanager
def _pillow_bomb_check_off() -> Iterator[None]:
    """Pillow's own check refuses a bomb without saying its size; `inspect_image` checks the
    size itself, against a lower limit, before decoding. Pillow's limit is a module global:
    this is for the one thread that inspects images in each process (split, predict)."""
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def inspect_image(data: bytes) -> tuple[str | None, bool]:
    """Checks encoded image bytes by decoding them fully.

    Returns `(reason, needs_reencoding)`: `reason` says why the image is unusable (None if
    it is fine); `needs_reencoding` is True for a decodable image that TensorFlow's JPEG
    decoder would choke on or misread (PNG/GIF/BMP content, CMYK, palette, alpha).
    """
    if not data:
        return "empty file", False
    try:
        with _pillow_bomb_check_off(), Image.open(io.BytesIO(data)) as image:
            # Opening reads only the header: the size is known before any pixel is decoded.
            width, height = image.size
            if width * height > MAX_IMAGE_PIXELS:
                return f"too many pixels: {width}x{height}, limit {MAX_IMAGE_PIXELS}", False
            image_format, mode = image.format, image.mode
            image.load()
    except UnidentifiedImageError:
        return "not a readable image", False
    except (OSError, SyntaxError, ValueError) as error:
        return f"corrupt image ({error})", False
    if width < 8 or height < 8:
        return f"too small ({width}x{height} pixels)", False
    return None, not (image_format == "JPEG" and mode in ("RGB", "L"))


def reencode_as_jpeg(data: bytes, quality: int = 95) -> bytes:
    """Any decodable image as a baseline RGB JPEG, flattening alpha onto white."""
    with Image.open(io.BytesIO(data)) as image:
        image.seek(0)
        rgba = image.convert("RGBA")
    background = Image.new("RGB", rgba.size, (255, 255, 255))
    background.paste(rgba, mask=rgba.getchannel("A"))
    out = io.BytesIO()
    background.save(out, format="JPEG", quality=quality)
    return out.getvalue()


def list_split(folder: Path) -> list[LabeledImage]:
    """The images of one split folder (`<split>/cats`, `<split>/dogs`)."""
    images: list[LabeledImage] = []
    for label, class_name in enumerate(CLASS_NAMES):
        images.extend(LabeledImage(path, label) for path in find_images(folder / class_name))
    return images
