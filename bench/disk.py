"""Disk used by a full run, against the raw archive, and how long `dvc status` takes.

A throwaway `devtools.pipeline_copy.PipelineCopy` runs `dvc repro` from scratch with the tests'
small models but the configured `split` fractions and image sizes for `augment` and
`features` (they decide the bytes written: how many variants are stored, at what size, and
flattened VGG16 features) and `finetune.enabled` as configured (another VGG16-sized model
when on). Then: bytes under `data/`, `models/` and
`.dvc/cache` (apparent, and on disk counting a hard-linked file once), each as a ratio to
the `--images` archive, and `dvc status` wall time, with the repository's `cache.type`
(`hardlink,copy`: the workspace and the cache share each file; with `reflink` first, DVC
3.67 commits directory outputs as copies). Last, for comparison, the same after
`dvc config cache.type copy` and `dvc checkout --relink`: DVC's default where the
filesystem has no reflinks, two copies of every output. `--repo DIR` measures an existing
repository where the pipeline ran instead (read only: no relink).

The ratio depends on how large the JPEGs are against what the pipeline writes per image.
`--resize 404x360` re-encodes the images first (JPEG quality 90) to Kaggle's mean size,
about 22 KB a file where the sample's are 3.8 KB: a stand-in for the real archive, whose
ratio is then measured against the re-encoded archive.

    python -m bench.disk [--images DIR_OR_ZIP] [--resize WxH] [--out bench/results] [--quick]
                         [--repo DIR]
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path

from bench.common import (
    Report,
    add_workdir_argument,
    base_parser,
    median,
    path_bytes,
    ratio,
    repo_config,
    timed,
)

IMAGE_PARTS = ("data/raw", "data/split", "data/augmented")
DATA_PARTS = (*IMAGE_PARTS, "data/features", "data/augmented_features", "models", "reports")
# Not DVC's, but written by every run: the MLflow store, its artifacts (models again).
TRACKING_PARTS = ("mlartifacts", "mlflow.db")
CACHE = ".dvc/cache"
DISK_TARGET = 2.0
RESIZED_QUALITY = 90  # re-encoded Kaggle-sized images average 23.8 KB, the real ones 22 KB


def usage(path: Path, seen: set[tuple[int, int]]) -> dict[str, int]:
    """Apparent bytes, allocated bytes of inodes not in `seen` (then added), and file count."""
    apparent = on_disk = files = 0
    candidates = [path] if path.is_file() else (p for p in path.rglob("*"))
    for item in candidates:
        if item.is_symlink() or not item.is_file():
            continue
        stat = item.stat()
        files += 1
        apparent += stat.st_size
        key = (stat.st_dev, stat.st_ino)
        if key not in seen:
            seen.add(key)
            on_disk += stat.st_blocks * 512
    return {"apparent": apparent, "on_disk": on_disk, "files": files}


def measure(root: Path) -> dict[str, dict[str, int]]:
    """Usage of each output folder, then of the cache beyond what the workspace already holds."""
    seen: set[tuple[int, int]] = set()
    parts = {part: usage(root / part, seen) for part in DATA_PARTS if (root / part).exists()}
    if (root / CACHE).exists():
        parts[CACHE] = usage(root / CACHE, seen)
    parts["total"] = {key: sum(p[key] for p in parts.values()) for key in ("apparent", "on_disk")}
    parts["total"]["files"] = sum(p["files"] for n, p in parts.items() if n != "total")
    for part in TRACKING_PARTS:
        if (root / part).exists():
            parts[part] = usage(root / part, seen)
    return parts


def resized_archive(source: Path, size: str, workdir: Path) -> Path:
    """The images of `source` re-encoded at `size` ("WIDTHxHEIGHT") into a stored zip."""
    import zipfile

    from PIL import Image

    from bench.common import prepare_images
    from devtools.fakes import jpeg_bytes

    width, height = (int(side) for side in size.lower().split("x"))
    target = workdir / f"resized-{width}x{height}.zip"
    with zipfile.ZipFile(target, "w", zipfile.ZIP_STORED) as archive:
        for image in prepare_images(source, workdir / "original"):
            with Image.open(image.path) as opened:
                resized = opened.convert("RGB").resize((width, height), Image.Resampling.BICUBIC)
            name = f"{'dog' if image.label else 'cat'}.{image.path.stem.split('.')[-1]}.jpg"
            archive.writestr(f"train/{name}", jpeg_bytes(resized, quality=RESIZED_QUALITY))
    return target


def image_count(source: Path) -> int | None:
    """Files in a folder or zip; None for a tar, which would need reading through."""
    import zipfile

    if source.is_dir():
        return sum(1 for p in source.rglob("*") if p.is_file())
    if zipfile.is_zipfile(source):
        with zipfile.ZipFile(source) as archive:
            return sum(not name.endswith("/") for name in archive.namelist())
    return None


def first_file_writable(folder: Path) -> bool | None:
    """Whether outputs stay writable (DVC makes linked outputs read-only to protect its cache)."""
    found = next((p for p in folder.rglob("*") if p.is_file()), None)
    return None if found is None else os.access(found, os.W_OK)


def status_seconds(run_dvc, repeats: int) -> dict[str, object]:
    times, output = [], ""
    for _ in range(repeats):
        seconds, output = timed(lambda: run_dvc("status"))
        times.append(seconds)
    return {"seconds": times, "median_s": median(times), "output_tail": output.strip()[-300:]}


def main(argv: Sequence[str] | None = None) -> Path:
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--repo", type=Path, help="measure this repository instead of a copy")
    parser.add_argument("--repeats", type=int, default=3, help="dvc status runs (default 3)")
    add_workdir_argument(parser)
    parser.add_argument(
        "--resize",
        metavar="WxH",
        help="re-encode the images at this size first (404x360: Kaggle's mean) and measure "
        "against that archive",
    )
    args = parser.parse_args(argv)
    if args.resize and args.repo:
        parser.error("--resize makes its own copy; it does not apply to --repo")
    if args.resize and not re.fullmatch(r"[1-9]\d*x[1-9]\d*", args.resize.lower()):
        parser.error(f"--resize {args.resize}: expected WIDTHxHEIGHT, such as 404x360")

    from devtools.pipeline_copy import TINY_PARAMS, PipelineCopy, clean_env

    report = Report("disk", "Disk use of a full run, and dvc status time", args.quick)
    images = args.images.expanduser().resolve()
    scratch = None
    if args.resize:
        scratch = tempfile.TemporaryDirectory(prefix="bench-disk-images-", dir=args.workdir)
        images = resized_archive(images, args.resize, Path(scratch.name))
    archive_bytes = path_bytes(images)
    count = image_count(images)
    mean_image_bytes = archive_bytes / count if count else None
    configured = repo_config()
    overrides = {}
    if not args.quick:  # what decides the bytes, and fine-tuning on or off, as configured
        overrides = {
            # The training split's size sets how many augmented variants are written.
            "split": configured.split.model_dump(mode="json"),
            "augment": {"variants": 1, "image_size": list(configured.augment.image_size)},
            "features": {"weights": "none"},
            "finetune": {"enabled": configured.finetune.enabled, "epochs": 1},
        }
    states: dict[str, dict] = {}
    holder = None
    try:
        if args.repo:
            root = args.repo.expanduser().resolve()
            copy = PipelineCopy(root=root, env=clean_env(root))
            repro_s = None
        else:
            holder = tempfile.TemporaryDirectory(prefix="bench-disk-", dir=args.workdir)
            root = Path(holder.name)
            copy = PipelineCopy.create(root, images, overrides)
            repro_s, _ = timed(lambda: copy.dvc("repro"))
        cache_type = copy.dvc("config", "cache.type", check=False).strip() or "default"
        states[f"as run (cache.type {cache_type})"] = {
            "usage": measure(root),
            "status": status_seconds(copy.dvc, args.repeats),
        }
        if not args.repo:
            copy.dvc("config", "cache.type", "copy")
            relink_s, _ = timed(lambda: copy.dvc("checkout", "--relink"))
            states["for comparison: cache.type copy + checkout --relink"] = {
                "usage": measure(root),
                "status": status_seconds(copy.dvc, args.repeats),
                "relink_s": relink_s,
                "split_files_writable": first_file_writable(root / "data" / "split"),
            }
    finally:
        for folder in (holder, scratch):
            if folder is not None:
                folder.cleanup()

    rows = []
    for name, state in states.items():
        used = state["usage"]
        for part, u in used.items():
            u["ratio_apparent_to_archive"] = ratio(u["apparent"], archive_bytes)
            u["ratio_on_disk_to_archive"] = ratio(u["on_disk"], archive_bytes)
            rows.append(
                [
                    name,
                    part,
                    u["files"],
                    u["apparent"] / 2**20,
                    u["on_disk"] / 2**20,
                    f"{u['ratio_on_disk_to_archive']:.1f}x",
                ]
            )
    first, *rest = states.values()
    report.settings = {
        "images": str(args.images),
        "resized_to": args.resize,
        "mean_image_bytes": mean_image_bytes,
        "repo": str(args.repo) if args.repo else "throwaway copy",
        "params": {**TINY_PARAMS, **overrides} if not args.repo else "as in the repository",
        "status_repeats": args.repeats,
    }
    report.results = {
        "archive_bytes": archive_bytes,
        "repro_from_scratch_s": repro_s,
        "states": states,
        "total_on_disk_to_archive": first["usage"]["total"]["ratio_on_disk_to_archive"],
        "dvc_status_s": first["status"]["median_s"],
    }

    def on_disk(*parts: str) -> int:
        return sum(first["usage"].get(part, {}).get("on_disk", 0) for part in parts)

    data_and_cache = on_disk(*(part for part in DATA_PARTS if part.startswith("data/")), CACHE)
    images_only = on_disk(*IMAGE_PARTS)
    report.results["data_and_cache_to_archive"] = ratio(data_and_cache, archive_bytes)
    report.results["images_to_archive"] = ratio(images_only, archive_bytes)
    if rest:
        report.results["comparison_total_on_disk_to_archive"] = rest[0]["usage"]["total"][
            "ratio_on_disk_to_archive"
        ]
    archive = f"{archive_bytes / 2**20:.1f} MiB, {images.name}"
    if mean_image_bytes:
        archive += f", {mean_image_bytes / 1024:.1f} KiB an image"
    report.table(
        f"Bytes against the raw archive ({archive}); "
        "on disk counts each hard-linked file once, the cache row only what the workspace "
        "does not already hold; total is data/, models/, reports/ and the cache "
        "(MLflow's store listed after it)",
        ["state", "folder", "files", "MiB apparent", "MiB on disk", "on disk / archive"],
        rows,
    )
    report.table(
        f"dvc status wall time (median of {args.repeats})",
        ["state", "seconds", "files (workspace + cache)"],
        [
            [name, s["status"]["median_s"], s["usage"]["total"]["files"]]
            for name, s in states.items()
        ],
    )
    measured = report.results["data_and_cache_to_archive"]
    report.target(
        "data/ + DVC cache, on disk / archive",
        measured,
        f"<= {DISK_TARGET:g}x",
        None if measured is None else measured <= DISK_TARGET,
    )
    report.target(
        "data/raw + split + augmented (the images), on disk / archive",
        report.results["images_to_archive"],
        "reported",
        None,
    )
    report.target("dvc status", report.results["dvc_status_s"], "reported", None, unit=" s")
    return report.write(args.out)


if __name__ == "__main__":
    main()
