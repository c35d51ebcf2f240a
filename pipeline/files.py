"""Atomic output writing and project-root resolution, shared by every stage.

A stage writes each output next to its final place and moves it there only when it is
complete, so a crash or a bad input never leaves a half-written output a later stage
could read. Run by hand (`python -m pipeline.<stage>`), the previous good output stays
until the new one is ready; under `dvc repro` DVC has removed it before the stage started
(it run-caches only stages whose outputs it may remove), and `dvc checkout <stage>` puts
back the last committed one from its cache.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.process import has_ended, this_host

# `dvc exp run --queue` and `--temp` execute each experiment in a copy of the repository
# under this folder; state shared between experiments (the MLflow store) lives above it.
DVC_TEMP_EXPERIMENTS = Path(".dvc") / "tmp" / "exps"


# Beside a stage's metrics.json, in its report folder: its MLflow run and model ids. Ids,
# not metrics: not among dvc.yaml's metrics, so that `dvc exp show` has no columns of ids.
MLFLOW_IDS_FILE = "mlflow.json"


def project_root(cwd: Path | None = None) -> Path:
    """The repository the user works in, also from inside a DVC temporary experiment copy
    or one of its subfolders.

    DVC sets `DVC_ROOT` to that repository for the stages it runs (queued and `--temp`
    experiments included); outside DVC the folder is recognised by its path, else it is
    the nearest folder up holding `dvc.yaml` (the CLIs run from a subfolder find the same
    MLflow store), else the current folder.
    """
    if cwd is None and os.environ.get("DVC_ROOT"):
        return Path(os.environ["DVC_ROOT"]).resolve()
    here = (cwd or Path.cwd()).resolve()
    parts = here.parts
    marker = DVC_TEMP_EXPERIMENTS.parts
    for index in range(len(parts) - len(marker) + 1):
        if parts[index : index + len(marker)] == marker:
            return Path(*parts[:index])
    return next(
        (folder for folder in (here, *here.parents) if (folder / "dvc.yaml").is_file()), here
    )


STAGING_TOKEN_BYTES = 6


def _staging_path(target: Path, suffix: str) -> Path:
    # Not tempfile.mkstemp/mkdtemp: they create owner-only entries (0600/0700), and outputs
    # should get the user's umask like any other new file, so teammates and containers can
    # read them. A random name in the target's folder keeps the final rename atomic.
    token = secrets.token_hex(STAGING_TOKEN_BYTES)
    return target.with_name(f".{target.stem}.{token}{suffix}")


def _remove_abandoned_staging(target: Path, suffix: str) -> None:
    """Staging entries of `target` that a killed run left behind (SIGKILL, out of memory):
    nothing else removes them, and an extraction's are gigabytes. Only names `_staging_path`
    makes for this target and suffix match; a stage never stages one target twice at once."""
    pattern = re.compile(
        rf"\.{re.escape(target.stem)}\.[0-9a-f]{{{2 * STAGING_TOKEN_BYTES}}}{re.escape(suffix)}"
    )
    if not target.parent.is_dir():
        return
    for entry in target.parent.iterdir():
        if pattern.fullmatch(entry.name):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yields an empty staging folder that replaces `target` only if the block succeeds."""
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned_staging(target, ".tmp")
    staging = _staging_path(target, ".tmp")
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    previous = target.with_name(f".{target.name}.old")
    shutil.rmtree(previous, ignore_errors=True)
    if target.exists() or target.is_symlink():
        os.replace(target, previous)
    os.replace(staging, target)
    shutil.rmtree(previous, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(target: Path) -> Iterator[Path]:
    """Yields a temporary path in `target`'s folder; it becomes `target` if the block succeeds."""
    target.parent.mkdir(parents=True, exist_ok=True)
    # The staging name keeps the suffix: Keras and NumPy pick the format from it.
    _remove_abandoned_staging(target, f".tmp{target.suffix}")
    staging = _staging_path(target, f".tmp{target.suffix}")
    staging.touch(exist_ok=False)
    try:
        yield staging
        os.replace(staging, target)  # fails onto a folder: the staging file goes too
    except BaseException:
        staging.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_files(*targets: Path) -> Iterator[list[Path]]:
    """Staging paths for outputs that belong together: none replaces its target until the
    block has written them all, so a failure never pairs a new output with an old one."""
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(atomic_file(target)) for target in targets]


@contextlib.contextmanager
def scratch_dir(prefix: str) -> Iterator[Path]:
    """A private folder under the system temp folder (`TMPDIR`), removed when the block ends.

    Its name holds this host and pid (`<prefix><host>-<pid>-<token>`): a run killed before
    it could remove the folder (SIGKILL, out of memory) leaves it behind, and the next one
    on this host removes every such folder whose process has ended.
    """
    root = Path(tempfile.gettempdir())
    pattern = re.compile(
        rf"{re.escape(prefix)}(?P<host>.+)-(?P<pid>[0-9]+)-[0-9a-f]{{{2 * STAGING_TOKEN_BYTES}}}"
    )
    for entry in root.glob(f"{glob.escape(prefix)}*"):
        found = pattern.fullmatch(entry.name)
        ended = found and has_ended(found["host"], int(found["pid"]))
        if ended and entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
    token = secrets.token_hex(STAGING_TOKEN_BYTES)
    folder = root / f"{prefix}{this_host()}-{os.getpid()}-{token}"
    folder.mkdir(mode=0o700)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def write_json(path: Path, data: Any) -> None:
    with atomic_file(path) as staging:
        staging.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_text(path: Path, text: str) -> None:
    with atomic_file(path) as staging:
        staging.write_text(text)
