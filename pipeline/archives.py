"""Safe extraction of `.zip` and `.tar(.gz)` archives.

The standard library writes the files: `zipfile.extractall`, and `tarfile.extractall` with
its "data" filter (nothing outside the target, no device files, no setuid bits). What they
leave to us is checked on every entry before anything is written, so a hostile or broken
archive is refused whole instead of part-extracted:

- names that would leave the target are refused, not rewritten: `zipfile` drops `../` and
  drive letters and `tarfile` strips a leading `/`, which can put two entries on one file;
- links, even to inside the target, and zip entries whose mode says link or device: a
  dataset is files and folders, and `zipfile` would write a link's target as a file;
- the number of entries, their sizes and how far they expand, so a few megabytes cannot
  fill the disk (a zip bomb). The sizes headers declare are the most that is written:
  `zipfile` stops an entry there (a longer one then fails its CRC), `tarfile` reads exactly
  that many bytes.
"""

from __future__ import annotations

import shutil
import stat
import tarfile
import zipfile
import zlib
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath

from tqdm import tqdm

from pipeline.errors import PipelineError

ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz")

# The full dataset is 25,000 images in about 850 MB; these leave room for the Kaggle
# archive with its test set while stopping zip bombs.
MAX_ENTRIES = 200_000
MAX_TOTAL_BYTES = 20 * 1024**3
MAX_ENTRY_BYTES = 4 * 1024**3  # the largest real entry is Kaggle's inner train.zip, 545 MB
# JPEGs barely compress and Kaggle's CSVs deflate about 5x, while zeros deflate 1000x. Under
# the floor nothing is refused for its ratio: a few KB of text may well deflate 100x.
MAX_RATIO = 100
RATIO_FLOOR = 1024**2
# The filter came with Python 3.12 and the security releases 3.10.12 and 3.11.4; on an
# older 3.10 the checks below alone keep every entry inside the target.
TAR_FILTER = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}


class ArchiveError(PipelineError, ValueError):
    """The archive cannot be extracted: it is corrupt, truncated or not an archive at all."""


class UnsafeArchiveError(ArchiveError):
    """The archive holds an entry that must not be extracted."""


@dataclass(frozen=True)
class Limits:
    max_entries: int = MAX_ENTRIES
    max_total_bytes: int = MAX_TOTAL_BYTES
    max_entry_bytes: int = MAX_ENTRY_BYTES
    max_ratio: float = MAX_RATIO


@dataclass(frozen=True)
class Entry:
    """What an archive's headers say of one entry, before anything is extracted."""

    name: str
    size: int
    compressed: int  # for a .tar.gz, the whole archive: it is compressed as one stream
    plain: bool  # a file or a folder, not a link or a device


def is_archive(path: Path) -> bool:
    return path.name.lower().endswith(ARCHIVE_SUFFIXES)


def safe_name(name: str) -> str:
    """The entry's name with `/` for every `\\` (zips made on Windows use it), or an error if
    it is empty, absolute or climbs out of the target."""
    if not name or "\0" in name:  # zipfile cuts a name at NUL: `\0x` reads as ''
        raise UnsafeArchiveError(f"refusing an entry named {name!r}: empty or with a NUL byte")
    normalized = name.replace("\\", "/")
    if normalized.startswith("/") or (len(normalized) > 1 and normalized[1] == ":"):
        raise UnsafeArchiveError(f"refusing absolute path in archive: {name!r}")
    if ".." in PurePosixPath(normalized).parts:
        raise UnsafeArchiveError(f"refusing path that leaves the target folder: {name!r}")
    return normalized


def check_ratio(what: str, size: int, compressed: int, limits: Limits) -> None:
    if size > RATIO_FLOOR and size > limits.max_ratio * compressed:
        raise UnsafeArchiveError(
            f"refusing {what}: it expands {size / max(compressed, 1):.0f}x ({compressed} bytes "
            f"to {size}), more than {limits.max_ratio:.0f}x: a zip bomb?"
        )


def check_entries(archive: Path, entries: list[Entry], limits: Limits) -> None:
    """Refuses the archive for its first entry that must not be extracted, or for what all
    its entries would write together."""
    total = sum(entry.size for entry in entries)
    if len(entries) > limits.max_entries:
        raise UnsafeArchiveError(f"archive has more than {limits.max_entries} entries")
    if total > limits.max_total_bytes:
        raise UnsafeArchiveError(
            f"archive would extract to more than {limits.max_total_bytes / 1024**3:.0f} GiB"
        )
    archive_bytes = archive.stat().st_size
    for entry in entries:
        safe_name(entry.name)
        if not entry.plain:
            raise UnsafeArchiveError(f"refusing link or special file in archive: {entry.name!r}")
        if entry.size > limits.max_entry_bytes:
            raise UnsafeArchiveError(
                f"refusing {entry.name!r}: it would extract to {entry.size} bytes, more than "
                f"{limits.max_entry_bytes} bytes for one entry"
            )
        # Capped at the archive's size: a header claiming a large compressed size cannot
        # hide a bomb.
        check_ratio(repr(entry.name), entry.size, min(entry.compressed, archive_bytes), limits)
    check_ratio(archive.name, total, archive_bytes, limits)  # many entries, each under 1 MiB


def progress(members: list, archive: Path) -> tqdm:
    return tqdm(members, desc=f"extract {archive.name}", unit="file", mininterval=2)


def extract_zip(archive: Path, target: Path, limits: Limits = Limits()) -> int:
    with zipfile.ZipFile(archive) as zf:
        members = zf.infolist()
        modes = [stat.S_IFMT(m.external_attr >> 16) for m in members]
        plain = [mode in (0, stat.S_IFREG, stat.S_IFDIR) for mode in modes]
        entries = [
            Entry(m.filename, m.file_size, m.compress_size, ok)
            for m, ok in zip(members, plain, strict=True)
        ]
        check_entries(archive, entries, limits)
        for member in members:  # zipfile reads an entry by its offset, writes it by this name
            member.filename = safe_name(member.filename)
        zf.extractall(target, progress(members, archive))
    return len(members)


def extract_tar(archive: Path, target: Path, limits: Limits = Limits()) -> int:
    with tarfile.open(archive) as tf:
        members = tf.getmembers()
        size = archive.stat().st_size
        entries = [Entry(m.name, m.size, size, m.isfile() or m.isdir()) for m in members]
        check_entries(archive, entries, limits)
        for member in members:
            member.name = safe_name(member.name)
        tf.extractall(target, progress(members, archive), **TAR_FILTER)
    return len(members)


def extract(archive: Path, target: Path, limits: Limits = Limits()) -> int:
    """Extracts `archive` into `target`; returns the number of entries.

    Raises `ArchiveError` for anything that stops the extraction, naming the archive.
    """
    target.mkdir(parents=True, exist_ok=True)
    try:
        if zipfile.is_zipfile(archive):
            return extract_zip(archive, target, limits)
        if tarfile.is_tarfile(archive):
            return extract_tar(archive, target, limits)
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error, OSError) as error:
        # OSError: entries that clash (a file and a folder of one name), or a full disk.
        raise ArchiveError(f"cannot extract {archive.name}: {error}") from error
    raise ArchiveError(
        f"cannot extract {archive.name}: neither a zip nor a tar archive, or one cut short "
        f"({archive})"
    )


def archive_stem(name: str) -> str:
    """`train.zip` -> `train`, `.cache.tar.gz` -> `.cache`: the name without its suffix."""
    lowered = name.lower()
    for suffix in sorted(ARCHIVE_SUFFIXES, key=len, reverse=True):
        if lowered.endswith(suffix):
            return name[: -len(suffix)] or "unpacked"
    return name


def tree_size(root: Path) -> tuple[int, int]:
    """Entries and bytes under `root`."""
    paths = list(root.rglob("*"))
    return len(paths), sum(p.stat().st_size for p in paths if p.is_file())


def merge_tree(source: Path, target: Path) -> None:
    """Moves `source` to `target`, merging folders; refuses to replace anything in `target`."""
    if not target.exists():
        source.rename(target)
        return
    if not (source.is_dir() and target.is_dir()):
        raise ArchiveError(f"unpacking would replace {target}: the archive and the tree clash")
    for child in source.iterdir():
        merge_tree(child, target / child.name)


def extract_nested(target: Path, limits: Limits = Limits()) -> list[Path]:
    """Unpacks archives found inside an extracted tree, as Kaggle ships `train.zip` in its zip.

    Each inner `name.zip` becomes a folder `name/`, merged into a folder of that name if the
    tree has one (a clash of names is an error, never an overwrite); the inner archive is
    then removed from the staging copy (the user's own file is never touched). The whole
    tree, inner archives unpacked, stays within `limits`.
    """
    unpacked: list[Path] = []
    for inner in sorted(p for p in target.rglob("*") if p.is_file() and is_archive(p)):
        folder = inner.with_name(archive_stem(inner.name))
        staging = inner.with_name(f".{inner.name}.extracting")
        entries, size = tree_size(target)
        remaining = replace(
            limits,
            max_entries=limits.max_entries - entries,
            max_total_bytes=limits.max_total_bytes - size,
        )
        extract(inner, staging, remaining)
        inner.unlink()
        # A zip of `train/` holds `train/...`: do not nest it as `train/train/...`.
        children = list(staging.iterdir())
        source = children[0] if len(children) == 1 and children[0].name == folder.name else staging
        merge_tree(source, folder)
        shutil.rmtree(staging, ignore_errors=True)
        unpacked.append(folder)
    return unpacked
