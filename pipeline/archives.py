"""Safe extraction of `.zip` and `.tar(.gz)` archives.

Entries that would land outside the target folder (`../`, absolute paths), links and
device files are refused, and the number of entries, their sizes and how far they expand are
bounded, so a hostile or broken archive cannot write anywhere but the staging folder it is
given, nor fill the disk from a few megabytes (a zip bomb).
"""

from __future__ import annotations

import shutil
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
COPY_CHUNK = 1024 * 1024


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

    def entry_budget(self, name: str, size: int, compressed: int) -> int:
        """The most bytes entry `name` may write, checking what its header declares first:
        `size` bytes from `compressed` ones (which the caller caps at the archive's size, so a
        header claiming a large compressed size cannot hide a bomb)."""
        if size > self.max_entry_bytes:
            raise UnsafeArchiveError(
                f"refusing {name!r}: it would extract to {size} bytes, more than "
                f"{self.max_entry_bytes} bytes for one entry"
            )
        check_ratio(repr(name), size, compressed, self)
        return min(self.max_entry_bytes, max(RATIO_FLOOR, int(self.max_ratio * compressed)))


def is_archive(path: Path) -> bool:
    return path.name.lower().endswith(ARCHIVE_SUFFIXES)


def safe_member_path(name: str) -> PurePosixPath:
    """The entry's relative path, or an error if it is absolute or climbs out of the target."""
    if not name or "\0" in name:  # zipfile cuts a name at NUL: `\0x` reads as ''
        raise UnsafeArchiveError(f"refusing an entry named {name!r}: empty or with a NUL byte")
    normalized = name.replace("\\", "/")
    path = PurePosixPath(normalized)
    if (
        path.is_absolute()
        or normalized.startswith("/")
        or (len(normalized) > 1 and normalized[1] == ":")
    ):
        raise UnsafeArchiveError(f"refusing absolute path in archive: {name!r}")
    if ".." in path.parts:
        raise UnsafeArchiveError(f"refusing path that leaves the target folder: {name!r}")
    return path


def check_ratio(what: str, size: int, compressed: int, limits: Limits) -> None:
    if size > RATIO_FLOOR and size > limits.max_ratio * compressed:
        raise UnsafeArchiveError(
            f"refusing {what}: it expands {size / max(compressed, 1):.0f}x ({compressed} bytes "
            f"to {size}), more than {limits.max_ratio:.0f}x: a zip bomb?"
        )


def _check_totals(count: int, total: int, limits: Limits) -> None:
    if count > limits.max_entries:
        raise UnsafeArchiveError(f"archive has more than {limits.max_entries} entries")
    if total > limits.max_total_bytes:
        raise UnsafeArchiveError(
            f"archive would extract to more than {limits.max_total_bytes / 1024**3:.0f} GiB"
        )


def _copy_bounded(source, target: Path, budget: int, name: str) -> int:
    """Copies at most `budget` bytes; the declared sizes of an archive can lie."""
    written = 0
    with target.open("wb") as out:
        while chunk := source.read(COPY_CHUNK):
            written += len(chunk)
            if written > budget:
                raise UnsafeArchiveError(
                    f"refusing {name!r}: it extracts to more than the {budget} bytes allowed"
                )
            out.write(chunk)
    return written


def extract_zip(archive: Path, target: Path, limits: Limits = Limits()) -> int:
    with zipfile.ZipFile(archive) as zf:
        members = zf.infolist()
        total = sum(m.file_size for m in members)
        _check_totals(len(members), total, limits)
        # Checked before anything is written; the budgets hold again while streaming.
        compressed = archive.stat().st_size
        budgets = {
            m: limits.entry_budget(m.filename, m.file_size, min(m.compress_size, compressed))
            for m in members
        }
        check_ratio(archive.name, total, compressed, limits)  # many entries, each under 1 MiB
        budget = limits.max_total_bytes
        for member in tqdm(members, desc=f"extract {archive.name}", unit="file", mininterval=2):
            relative = safe_member_path(member.filename)
            mode = member.external_attr >> 16
            if mode and (mode & 0o170000) not in (0, 0o100000, 0o040000):
                raise UnsafeArchiveError(
                    f"refusing link or special file in archive: {member.filename!r}"
                )
            destination = target.joinpath(*relative.parts)
            if member.is_dir():
                destination.mkdir(parents=True, exist_ok=True)
                continue
            destination.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(member) as source:
                allowed = min(budget, budgets[member])
                budget -= _copy_bounded(source, destination, allowed, member.filename)
    return len(members)


def extract_tar(archive: Path, target: Path, limits: Limits = Limits()) -> int:
    with tarfile.open(archive) as tf:
        members = tf.getmembers()
        total = sum(m.size for m in members)
        _check_totals(len(members), total, limits)
        # A .tar.gz is compressed as one stream: no entry takes more than the whole archive.
        compressed = archive.stat().st_size
        for member in members:
            limits.entry_budget(member.name, member.size, compressed)
        check_ratio(archive.name, total, compressed, limits)
        budget = limits.max_total_bytes
        for member in tqdm(members, desc=f"extract {archive.name}", unit="file", mininterval=2):
            relative = safe_member_path(member.name)
            if not (member.isfile() or member.isdir()):
                raise UnsafeArchiveError(
                    f"refusing link or special file in archive: {member.name!r}"
                )
            destination = target.joinpath(*relative.parts)
            if member.isdir():
                destination.mkdir(parents=True, exist_ok=True)
                continue
            destination.parent.mkdir(parents=True, exist_ok=True)
            source = tf.extractfile(member)
            if source is None:
                raise UnsafeArchiveError(f"cannot read archive entry {member.name!r}")
            with source:  # tarfile reads exactly the size the header declares, never more
                budget -= _copy_bounded(source, destination, budget, member.name)
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
