"""Stage 1: fetch the Dogs vs. Cats training images into `paths.raw`.

Sources (`download.source`):
  petimages  Microsoft's public PetImages mirror over HTTPS; no account needed.
  kaggle     the competition files through the Kaggle API and the user's credentials.
  local      a `.zip`, `.tar(.gz)` or folder the user already has.

Whatever the source, `paths.raw` ends up holding the images exactly as published, in
Kaggle's (`train/cat.N.jpg`) or PetImages' (`PetImages/Cat/N.jpg`) layout.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import mlflow

from pipeline import archives, process, stage
from pipeline.config import DownloadConfig, FileCheck, MirrorConfig
from pipeline.errors import PipelineError
from pipeline.files import atomic_dir, project_root, write_json
from pipeline.images import CLASS_NAMES, find_labeled_images

# Small enough that a broken transfer loses little of what it received before the break.
CHUNK = 64 * 1024
LAYOUT_HELP = (
    "Expected one of these layouts:\n"
    "  Kaggle:    train/cat.0.jpg, train/dog.0.jpg, ...\n"
    "             (or the competition's zip, which holds train.zip)\n"
    "  PetImages: PetImages/Cat/0.jpg, PetImages/Dog/0.jpg, ... (folder names in any case)"
)


class DownloadError(PipelineError, RuntimeError):
    """The data could not be fetched; the message says what to do."""


@dataclass(frozen=True)
class RawSummary:
    layout: str
    images: int
    per_class: dict[str, int]
    unlabeled: int

    def as_dict(self) -> dict:
        return {
            "layout": self.layout,
            "images": self.images,
            "per_class": self.per_class,
            "unlabeled": self.unlabeled,
        }


def detect_layout(root: Path) -> RawSummary:
    """Counts the labelled images below `root` and names their layout, or refuses the tree."""
    labeled, unlabeled = find_labeled_images(root)
    counts = Counter(item.label for item in labeled)
    if not labeled or len(counts) < len(CLASS_NAMES):
        found = f"{len(labeled)} labelled image(s), classes {sorted(counts)}"
        raise DownloadError(
            f"{root} does not hold images of both cats and dogs ({found}).\n{LAYOUT_HELP}"
        )
    by_name = sum(1 for item in labeled if item.path.name.lower().startswith(("cat.", "dog.")))
    layout = "kaggle" if by_name * 2 > len(labeled) else "petimages"
    return RawSummary(
        layout=layout,
        images=len(labeled),
        per_class={name: counts[label] for label, name in enumerate(CLASS_NAMES)},
        unlabeled=len(unlabeled),
    )


def raw_metrics(summary: RawSummary, skipped: int) -> dict[str, int]:
    return {
        "data/raw_images": summary.images,
        "data/raw_unlabeled": summary.unlabeled,
        "data/raw_skipped": skipped,
        **{f"data/raw_{name}": count for name, count in summary.per_class.items()},
    }


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def mismatch(path: Path, check: FileCheck, setting: str) -> str | None:
    """How `path` differs from the size and SHA-256 that `setting` in params.yaml pins, or None.

    The size first: it costs nothing and catches a truncated transfer."""
    if check.size is not None and (size := path.stat().st_size) != check.size:
        return f"has {size} bytes, expected {check.size} ({setting}.size)"
    if check.sha256 is not None and (actual := sha256_of(path)) != check.sha256:
        return f"has SHA-256 {actual}, expected {check.sha256} ({setting}.sha256)"
    return None


def fetch_http(mirror: MirrorConfig, destination: Path, timeout: float = 60.0) -> Path:
    """Streams `mirror.url` to `destination`, resuming a partial `.part` file where it can.

    The file appears at `destination` only once its size and SHA-256 match the pinned ones.
    """
    import requests
    from tqdm import tqdm

    if destination.exists() and not mismatch(destination, mirror, "download.petimages"):
        return destination  # an intact earlier download: no network work
    partial = destination.with_name(destination.name + ".part")
    offset = partial.stat().st_size if partial.exists() else 0
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    url = str(mirror.url)
    try:
        with requests.get(url, stream=True, headers=headers, timeout=timeout) as response:
            if response.status_code == 416 and mirror.size and offset >= mirror.size:
                pass  # the previous run got every byte; only the checks remain
            else:
                response.raise_for_status()
                if offset and response.status_code != 206:
                    offset = 0  # the server ignored the range: start over
                total = int(response.headers.get("Content-Length", 0)) + offset or mirror.size
                with (
                    partial.open("ab" if offset else "wb") as out,
                    tqdm(
                        total=total, initial=offset, unit="B", unit_scale=True, desc="download"
                    ) as bar,
                ):
                    for chunk in response.iter_content(CHUNK):
                        out.write(chunk)
                        bar.update(len(chunk))
    except requests.RequestException as error:
        what = "timed out" if isinstance(error, requests.Timeout) else f"failed: {error}"
        raise DownloadError(
            f"Downloading {url} {what}.\n"
            f"{partial.stat().st_size if partial.exists() else 0} bytes are kept in {partial}; "
            "run the stage again to resume, or use download.source: local with a copy you have."
        ) from error
    if problem := mismatch(partial, mirror, "download.petimages"):
        partial.unlink()
        raise DownloadError(
            f"{url} {problem}: the transfer broke or the file changed upstream. Run again; "
            "if it persists, check the file and update that value."
        )
    os.replace(partial, destination)
    return destination


def kaggle_error_help(competition: str, error: Exception) -> str:
    """One paragraph saying what went wrong with the Kaggle download and what to do.

    Built from the error's type and HTTP status only, never its text or the environment, so
    no credential can leak into logs or MLflow.
    """
    import requests

    status = getattr(getattr(error, "response", None), "status_code", None)
    name = type(error).__name__
    if name in ("UnauthenticatedError", "CredentialError") or status == 401:
        return (
            "Kaggle did not accept your credentials (or found none). Create an API token at "
            "https://www.kaggle.com/settings and put it in ~/.kaggle/kaggle.json, or set "
            "KAGGLE_USERNAME and KAGGLE_KEY; or use download.source: petimages, which needs "
            "no account."
        )
    if status == 403:
        return (
            f"Kaggle refused the download of '{competition}': the competition's rules have not "
            f"been accepted for this account. Accept them at "
            f"https://www.kaggle.com/competitions/{competition}/rules, then run again."
        )
    if status == 404:
        return f"Kaggle has no competition '{competition}': check download.kaggle_competition."
    if name == "DataCorruptionError":
        return (
            f"The Kaggle download of '{competition}' did not match Kaggle's checksum (a broken "
            "transfer): run again."
        )
    if isinstance(error, (requests.ConnectionError, requests.Timeout)):
        return (
            "Could not reach Kaggle (network error). Check your connection or proxy and run "
            "again; download.source: local takes a copy you already have."
        )
    return f"The Kaggle download of '{competition}' failed ({name}, HTTP status {status})."


KAGGLE_TRAIN = "train.zip"


def fetch_kaggle(competition: str, check: FileCheck = FileCheck()) -> Path:
    """Downloads the competition's files with `kagglehub`, using the user's Kaggle credentials.

    kagglehub checks each transfer against Kaggle's MD5, but serves later runs from its cache
    unchecked: a train.zip unlike its pinned size or SHA-256 is downloaded once more, afresh.
    """
    try:
        import kagglehub
    except ImportError as error:
        raise DownloadError(
            "download.source is kaggle, but kagglehub is not installed: pip install -e '.[kaggle]'"
        ) from error
    problem = None
    for fresh in (False, True):
        try:
            folder = Path(kagglehub.competition_download(competition, force_download=fresh))
        except Exception as error:
            raise DownloadError(kaggle_error_help(competition, error)) from None
        train = folder / KAGGLE_TRAIN
        if not train.is_file() or not (problem := mismatch(train, check, "download.kaggle_train")):
            return folder  # a competition without train.zip is refused for its layout
    raise DownloadError(
        f"Kaggle's {KAGGLE_TRAIN} {problem}, downloaded twice: Kaggle changed the file or the "
        "value is wrong. Check the file and update that value, or set it to null."
    )


def link_reason(path: Path) -> str:
    return f"a link to {os.readlink(path)}; only regular files inside the folder are copied"


def copy_regular_file(path: Path, destination: Path) -> str | None:
    """Copies `path` if it is a regular file; else returns why not, reading nothing."""
    if path.is_symlink():
        return link_reason(path)
    try:
        # No following a link made since the check; no blocking on a FIFO.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | os.O_NONBLOCK)
    except OSError as error:
        return f"cannot read it ({error.strerror})"
    with os.fdopen(fd, "rb") as reader:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return "not a regular file (a FIFO, socket or device)"
        with destination.open("xb") as writer:
            shutil.copyfileobj(reader, writer)
    return None


def copy_folder(source: Path, staging: Path) -> list[tuple[Path, str]]:
    """Copies the regular files below `source` into `staging`, keeping the tree, and returns
    `(path, reason)` for what it skipped: links to files or folders, inside `source` or out
    (one to /etc/passwd would otherwise land in the raw data and `dvc push`), and special
    files. Nothing outside `source` is read."""
    skipped: list[tuple[Path, str]] = []
    for folder, dirnames, filenames in os.walk(source):  # does not descend into linked folders
        here = Path(folder)
        target = staging / here.relative_to(source)
        target.mkdir(parents=True, exist_ok=True)
        for name in sorted(dirnames):
            if (here / name).is_symlink():
                dirnames.remove(name)
                skipped.append((here / name, link_reason(here / name)))
        dirnames.sort()
        for name in sorted(filenames):
            if reason := copy_regular_file(here / name, target / name):
                skipped.append((here / name, reason))
    return sorted(skipped)


def populate_raw(source: Path, staging: Path) -> list[tuple[Path, str]]:
    """Copies or extracts `source` into the empty `staging` folder, leaving `source` untouched;
    returns the files of a folder that were not copied, with the reason for each."""
    skipped: list[tuple[Path, str]] = []
    if source.is_dir():
        skipped = copy_folder(source, staging)
    elif source.is_file() and archives.is_archive(source):
        archives.extract(source, staging)
    else:
        raise DownloadError(
            f"{source} is not a folder or a .zip/.tar/.tar.gz archive.\n{LAYOUT_HELP}"
        )
    archives.extract_nested(staging)
    return skipped


def resolve_local_path(cfg: DownloadConfig, raw: Path) -> Path:
    assert cfg.local_path is not None
    path = cfg.local_path.expanduser()
    # Relative to the user's repository, also when DVC runs the stage in a temporary copy.
    path = path if path.is_absolute() else project_root() / path
    if not path.exists():
        raise DownloadError(f"download.local_path {path} does not exist")
    if path.is_dir() and path.resolve() in (raw.resolve(), *raw.resolve().parents):
        raise DownloadError(
            f"download.local_path {path} holds paths.raw ({raw}), where the stage writes: "
            "point it at the dataset's own folder or archive"
        )
    return path


def kaggle_train_pin(folder: Path) -> dict[str, dict[str, int | str]]:
    """The size and SHA-256 of the competition's train.zip, as `download.kaggle_train` pins them."""
    train = folder / KAGGLE_TRAIN
    if not train.is_file():
        return {}
    return {"kaggle_train": {"size": train.stat().st_size, "sha256": sha256_of(train)}}


def acquire(cfg: DownloadConfig, raw: Path) -> Path:
    """The local file or folder holding the data for the configured source."""
    if cfg.source == "local":
        return resolve_local_path(cfg, raw)
    if cfg.source == "kaggle":
        return fetch_kaggle(cfg.kaggle_competition, cfg.kaggle_train)
    # Kept beside the data, out of DVC's outputs: a broken transfer resumes from here.
    downloads = raw.parent / ".downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    archive = downloads / (Path(cfg.petimages.url.path or "").name or "petimages.zip")
    return fetch_http(cfg.petimages, archive)


def main() -> None:
    with stage.context("download") as ctx:
        cfg, raw = ctx.cfg.download, ctx.cfg.paths.raw
        source = acquire(cfg, raw)
        with atomic_dir(raw) as staging:
            skipped = populate_raw(source, staging)
            for path, reason in skipped:
                print(f"download: skipped {path}: {reason}", file=sys.stderr)
            summary = detect_layout(staging)
        pin = kaggle_train_pin(source) if cfg.source == "kaggle" else {}
        report = {"source": cfg.source, **summary.as_dict(), "skipped": len(skipped), **pin}
        write_json(ctx.reports / "summary.json", report)
        mlflow.log_metrics(raw_metrics(summary, len(skipped)))
    print(
        f"download: {summary.images} labelled images ({summary.per_class}) in {summary.layout} "
        f"layout from {cfg.source} into {raw}"
    )


if __name__ == "__main__":
    process.run(main)
