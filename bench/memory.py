"""Peak memory and time of every stage as the number of images grows.

For each N (default 1,000, 4,000 and 16,000), N small JPEGs (128x128, generated like the
tests' images, half cats, half dogs) go into a fresh `devtools.pipeline_copy.PipelineCopy`,
and each stage runs as its own subprocess, `python -m pipeline.<stage>`, in DVC's order.
Its peak resident memory is the child's `ru_maxrss` from `os.wait4`. A stage whose peak
stays flat as N grows streams its data; time should grow linearly in N. The watched stages
(train_cnn, extract_features) run `--repeats` times at each N and the fastest run counts,
as `timeit` does: on a shared 2-core machine the same work has taken 1.8x longer from one
run to the next, which would read as non-linearity. The training stages run `--epochs`
(default 3, never stopped early) and images are small (`--image-size`, default 32) so the
default run fits in about 13 minutes on a 2-core CPU (25 on a slower Xeon): VGG16 at
150x150 would take an hour for the largest N alone. With one epoch, train_cnn's work at
1,000 and 4,000 images (2 and 8 s) drowns in its ~17 s of start-up and the noise around it.

Small images make small features (1x1x512 at 32x32), which hide what the head holds: so
`train_head`'s feeding is also measured apart, on N random feature vectors of the configured
backbone's full length (8,192 for VGG16 at 150x150), stored as `features.dtype`, each way
in its own subprocess: as `pipeline.train_head.feature_dataset` feeds it, and as it was fed
before (every row as float32, shuffled through a buffer of all of them).

    python -m bench.memory [--sizes 1000,4000,16000] [--repeats 3] [--epochs 3] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import subprocess
import sys
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from bench.common import (
    REPO_ROOT,
    Report,
    Timer,
    add_workdir_argument,
    base_parser,
    dvc_stages,
    ratio,
    repo_config,
    write_synthetic_images,
)

WATCHED = ("train_cnn", "extract_features")  # the stages whose peaks must stay flat
DEFAULT_SIZES = (1000, 4000, 16000)
QUICK_SIZES = (16, 32)
FLAT_GROWTH = 1.25  # peak at the largest N at most 25% above the peak at the smallest
# Linear: one straight line through (N, seconds) predicts every measured time within 10%.
# (R^2 misleads here: where start-up dominates, noise outweighs the small slope.)
LINEAR_TOLERANCE = 0.10


HEAD_FEEDINGS = {
    "indices": "feature_dataset (stored dtype, gathered by index)",
    "rows": "before: float32 rows through a shuffle buffer",
}
QUICK_FEATURE_DIM = 64


def rows_dataset(features: np.ndarray, labels: np.ndarray, batch_size: int, seed: int | None):
    """How the head was fed before `feature_dataset`, on one replica (without
    `splittable_over_replicas`): float32 rows, shuffled through a buffer holding all of them."""
    import tensorflow as tf

    dataset = tf.data.Dataset.from_tensor_slices((features, labels.astype(np.float32)))
    if seed is not None:
        dataset = dataset.shuffle(len(labels), seed=seed, reshuffle_each_iteration=True)
    return dataset.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def probe_head_feeding(feeding: str, train: int, validation: int, dim: int, epochs: int) -> None:
    """Run in a fresh interpreter: the configured head, fed `feeding`, for `epochs` on random
    post-ReLU-like features of `dim`, held as `features.dtype` as `np.load` gives them."""
    import keras

    from pipeline.train_head import feature_dataset
    from pipeline.training import fit
    from pipeline.transfer import build_head

    cfg = repo_config()
    rng = np.random.default_rng(cfg.common.seed)
    count = train + validation
    # Filled 1,000 rows at a time: one float64 draw of them all would outweigh what is measured.
    features = np.empty((count, dim), cfg.features.dtype)
    for start in range(0, count, 1000):
        rows = features[start : start + 1000]
        rows[:] = np.maximum(rng.normal(0.25, 1.0, rows.shape), 0)
    labels = (rng.random(count) < 0.5).astype(np.int8)
    if feeding == "rows":  # as `load_features` gave them then: float32, the stored ones freed
        features = features.astype(np.float32)
    make = feature_dataset if feeding == "indices" else rows_dataset
    batch = cfg.head.batch_size
    data = (
        make(features[:train], labels[:train], batch, cfg.common.seed),
        make(features[train:], labels[train:], batch, None),
    )
    keras.utils.set_random_seed(cfg.common.seed)
    head = build_head(dim, cfg.head, cfg.compute.steps_per_execution)
    with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):
        fit(head, *data, cfg.head.model_copy(update={"epochs": epochs}), log_to_mlflow=False)


def configured_feature_dim() -> int:
    """The configured backbone's feature length, found in a child process.

    Not here: a child's `ru_maxrss` starts from its parent's resident size when it forks, so
    a backbone built in this process would count in every stage's peak measured after it.
    """
    from bench.incremental import in_fresh_interpreter

    _, last_line, _ = in_fresh_interpreter(
        "from bench.common import repo_config; "
        "from bench.training_step import backbone_feature_size; "
        "print(backbone_feature_size(repo_config().features))"
    )
    return int(last_line)


def measure_head_feeding(
    sizes: Sequence[int], dim: int, epochs: int, workdir: Path, timeout: float
) -> dict[str, dict[int, dict]]:
    """Peak RSS and seconds of `probe_head_feeding`, each feeding at each N, taking turns."""
    from devtools.pipeline_copy import probe_env
    from pipeline.split import split_counts

    split = repo_config().split
    measured: dict[str, dict[int, dict]] = {feeding: {} for feeding in HEAD_FEEDINGS}
    for n in sizes:
        train, validation, _ = split_counts(n, split)
        for feeding in HEAD_FEEDINGS:
            code = (
                "from bench.memory import probe_head_feeding; "
                f"probe_head_feeding({feeding!r}, {train}, {validation}, {dim}, {epochs})"
            )
            log = workdir / f"head-{feeding}-{n}.log"
            result = run_or_exit(
                [sys.executable, "-c", code],
                workdir,
                probe_env(REPO_ROOT),
                log,
                timeout,
                f"train_head fed by {feeding} at N={n}",
            )
            measured[feeding][n] = {**result, "train": train, "validation": validation}
    return measured


def run_measured(
    command: Sequence[str], cwd: Path, env: dict[str, str], log: Path, timeout: float
) -> dict[str, float | int]:
    """Wall seconds, CPU seconds and peak RSS (MiB) of one child process, from `os.wait4`."""
    with log.open("wb") as handle, Timer() as timer:
        process = subprocess.Popen(command, cwd=cwd, env=env, stdout=handle, stderr=handle)
        watchdog = threading.Timer(timeout, process.kill)
        watchdog.start()
        try:
            _, status, usage = os.wait4(process.pid, 0)
        except BaseException:
            process.kill()
            raise
        finally:
            watchdog.cancel()
        # wait4 reaped the child; tell Popen, so it never waits for it again.
        process.returncode = os.waitstatus_to_exitcode(status)
    return {
        "seconds": timer.seconds,
        "cpu_seconds": usage.ru_utime + usage.ru_stime,
        "peak_rss_mib": usage.ru_maxrss / 1024,  # Linux reports KiB
        "returncode": process.returncode,
    }


def run_or_exit(
    command: Sequence[str], cwd: Path, env: dict[str, str], log: Path, timeout: float, what: str
) -> dict[str, float | int]:
    """`run_measured`, printed as `what`; a failure ends the benchmark with the log's tail."""
    result = run_measured(command, cwd, env, log, timeout)
    if result["returncode"] != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise SystemExit(f"memory: {what} failed:\n{tail}")
    print(
        f"memory: {what}: {result['seconds']:.1f} s, peak {result['peak_rss_mib']:.0f} MiB",
        flush=True,
    )
    return result


def fit_line(xs: Sequence[float], ys: Sequence[float]) -> dict[str, float] | None:
    """Least-squares `y = intercept + slope * x`, its R^2 and its largest relative miss.

    None below 3 points: two points always lie on a line.
    """
    if len(xs) < 3:
        return None
    x, y = np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)
    slope, intercept = np.polyfit(x, y, 1)
    predicted = intercept + slope * x
    residual = float(np.sum((y - predicted) ** 2))
    total = float(np.sum((y - y.mean()) ** 2))
    return {
        "intercept": float(intercept),
        "slope": float(slope),
        "r2": 1.0 - residual / total if total else 1.0,
        "max_relative_miss": float(np.max(np.abs(y - predicted) / y)),
    }


def measure(
    args: argparse.Namespace, sizes: list[int], params: dict, repeats: int
) -> tuple[dict, dict, dict]:
    """Every stage at every size, the head's feedings, then the import floors."""
    from devtools.pipeline_copy import probe_env

    per_size: dict[int, dict] = {}
    with tempfile.TemporaryDirectory(prefix="bench-memory-", dir=args.workdir) as workdir:
        for n in sizes:
            per_size[n] = measure_size(n, Path(workdir), params, args.timeout, repeats)
        head_feeding = measure_head_feeding(
            sizes, args.feature_dim, params["head"]["epochs"], Path(workdir), args.timeout
        )
        floors = {
            name: run_measured(
                [sys.executable, "-c", f"import pipeline.{name}"],
                Path(workdir),
                probe_env(REPO_ROOT),
                Path(workdir) / f"floor-{name}.log",
                args.timeout,
            )
            for name in ("split", "train_cnn")
        }
    return per_size, floors, head_feeding


def reload(report: Report, path: Path) -> tuple[list[int], dict, int, dict, dict, dict]:
    """The measurements of an earlier run's JSON, to summarize them again without re-running."""
    old = json.loads(path.read_text())
    sizes = [int(n) for n in old["settings"]["sizes"]]
    per_size = {
        n: {
            stage: {
                key: s[key][str(n)]
                for key in ("seconds", "peak_rss_mib", "cpu_seconds", "all_seconds")
                if key in s
            }
            for stage, s in old["results"]["stages"].items()
        }
        for n in sizes
    }
    report.machine = old["machine"]
    report.notes.append(
        f"Summarized again from {path.name}: measured from {old['started_at']}, "
        f"{old['wall_s']:.0f} s, by `{old['command'].strip()}`."
    )
    settings = old["settings"]
    head_feeding = {
        feeding: {int(n): run for n, run in runs.items()}
        for feeding, runs in old["results"].get("head_feeding", {}).items()
    }
    return (
        sizes,
        settings["params"],
        settings["image_size"],
        per_size,
        old["results"]["import_floor"],
        head_feeding,
    )


def memory_params(image_size: int, finetune: bool, epochs: int = 1) -> dict[str, dict]:
    """Overrides of the tests' tiny params: the configured models, small images, few epochs.

    The training stages run `epochs` with patience as long: the same epochs at every N.

    Fine-tuning runs VGG16 forwards and its top backwards on every image, several times
    extraction's work; it is off unless asked for, so the default run stays near 25 minutes.
    """
    size = [image_size, image_size]
    return {
        "augment": {"variants": 1, "image_size": size},
        "train_cnn": {"image_size": size, "epochs": epochs, "patience": epochs, "warmup_epochs": 0},
        "features": {"weights": "none", "image_size": size},
        "head": {"epochs": epochs, "patience": epochs},
        "finetune": {"enabled": finetune, "epochs": 1, "patience": 1},
    }


def measure_size(
    n: int, workdir: Path, params: dict[str, dict], timeout: float, repeats: int = 1
) -> dict[str, dict[str, float | int]]:
    from devtools.pipeline_copy import PipelineCopy

    source = write_synthetic_images(workdir / f"images-{n}", n)
    repo = workdir / f"repo-{n}"
    repo.mkdir()
    copy = PipelineCopy.create(repo, source, params)
    measured = {}
    for stage, cmd in dvc_stages(repo).items():
        command = shlex.split(cmd)
        if command[0] == "python":  # this interpreter, as DVC finds it first on PATH
            command[0] = sys.executable
        runs = []
        for attempt in range(repeats if stage in WATCHED else 1):
            log = workdir / f"{n}-{stage}-{attempt}.log"
            runs.append(
                run_or_exit(command, repo, copy.env, log, timeout, f"stage {stage} at N={n}")
            )
        measured[stage] = fastest_run(runs)
    return measured


def fastest_run(runs: Sequence[dict[str, float | int]]) -> dict:
    """The fastest run's times, the highest peak of all, and every run's seconds."""
    fastest = min(runs, key=lambda run: run["seconds"])
    return {
        **fastest,
        "peak_rss_mib": max(run["peak_rss_mib"] for run in runs),
        "all_seconds": [run["seconds"] for run in runs],
    }


def main(argv: Sequence[str] | None = None) -> Path:
    parser = base_parser(__doc__.split("\n\n")[0], images=False)
    parser.add_argument(
        "--sizes", help="comma-separated image counts (default 1000,4000,16000; quick 16,32)"
    )
    parser.add_argument("--image-size", type=int, default=32, help="model input side (32-1024)")
    parser.add_argument(
        "--feature-dim",
        type=int,
        help="feature length for the head's feeding (default: the configured backbone's; "
        f"quick {QUICK_FEATURE_DIM})",
    )
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per stage")
    add_workdir_argument(parser)
    parser.add_argument("--finetune", action="store_true", help="run the finetune stage too")
    parser.add_argument(
        "--epochs", type=int, help="epochs of train_cnn and train_head (default 3; quick 1)"
    )
    parser.add_argument(
        "--repeats",
        type=int,
        help="runs of train_cnn and extract_features per N, fastest counts (default 3; quick 1)",
    )
    parser.add_argument(
        "--from-json", type=Path, help="summarize an earlier run's memory.json, measuring nothing"
    )
    args = parser.parse_args(argv)
    default = 1 if args.quick else 3
    epochs = default if args.epochs is None else args.epochs
    repeats = default if args.repeats is None else args.repeats
    if epochs < 1 or repeats < 1:
        parser.error("--epochs and --repeats: at least 1")
    params = memory_params(args.image_size, args.finetune, epochs)
    if args.sizes:
        sizes = sorted(int(n) for n in args.sizes.split(","))
    else:
        sizes = list(QUICK_SIZES if args.quick else DEFAULT_SIZES)
    if sizes[0] < 8:
        parser.error("--sizes: at least 8 images, so every split gets both classes")
    if args.feature_dim is None and not args.from_json:
        args.feature_dim = QUICK_FEATURE_DIM if args.quick else configured_feature_dim()

    report = Report("memory", "Peak memory and time per stage as N grows", args.quick)
    image_size = args.image_size
    if args.from_json:
        sizes, params, image_size, per_size, floors, head_feeding = reload(report, args.from_json)
        old_settings = json.loads(args.from_json.read_text())["settings"]
        args.feature_dim = old_settings.get("feature_dim")
        repeats = old_settings.get("repeats_of_watched_stages", 1)
    else:
        per_size, floors, head_feeding = measure(args, sizes, params, repeats)

    stages: dict[str, dict] = {}
    for stage in per_size[sizes[0]]:
        peaks = [per_size[n][stage]["peak_rss_mib"] for n in sizes]
        seconds = [per_size[n][stage]["seconds"] for n in sizes]
        fit = fit_line(sizes, seconds)
        growth = ratio(peaks[-1], peaks[0]) if len(sizes) > 1 else None
        stages[stage] = {
            "peak_rss_mib": dict(zip(sizes, peaks, strict=True)),
            "seconds": dict(zip(sizes, seconds, strict=True)),
            "cpu_seconds": {n: per_size[n][stage]["cpu_seconds"] for n in sizes},
            "all_seconds": {n: per_size[n][stage].get("all_seconds", []) for n in sizes},
            "peak_growth": growth,
            "peak_flat": None if growth is None else growth <= FLAT_GROWTH,
            "time_fit": fit,
            "time_linear": None if fit is None else fit["max_relative_miss"] <= LINEAR_TOLERANCE,
            "ms_per_image_marginal": None
            if len(sizes) < 2
            else 1000 * (seconds[-1] - seconds[0]) / (sizes[-1] - sizes[0]),
        }
    watched = WATCHED
    report.settings = {
        "sizes": sizes,
        "image_size": image_size,
        "params": params,
        "generated_image_side": 128,
        "repeats_of_watched_stages": repeats,
        "flat_if_growth_at_most": FLAT_GROWTH,
        "linear_if_line_misses_at_most": LINEAR_TOLERANCE,
        "feature_dim": args.feature_dim,
    }
    report.results = {
        "stages": stages,
        "import_floor": floors,
        "training_and_extraction_peaks_flat": all(stages[s]["peak_flat"] for s in watched)
        if len(sizes) > 1
        else None,
        "training_and_extraction_time_linear": all(stages[s]["time_linear"] for s in watched)
        if len(sizes) > 2
        else None,
        "head_feeding": head_feeding,
        "head_feeding_peak_rows_over_indices": {
            n: ratio(head_feeding["rows"][n]["peak_rss_mib"], run["peak_rss_mib"])
            for n, run in head_feeding.get("indices", {}).items()
        },
    }
    headers = ["stage"] + [f"peak MiB, N={n:,}" for n in sizes] + ["growth", "flat"]
    report.table(
        f"Peak RSS per stage (import floor: {floors['train_cnn']['peak_rss_mib']:.0f} MiB with "
        f"TensorFlow, {floors['split']['peak_rss_mib']:.0f} MiB without)",
        headers,
        [
            [stage]
            + [s["peak_rss_mib"][n] for n in sizes]
            + [None if s["peak_growth"] is None else f"{s['peak_growth']:.2f}x", s["peak_flat"]]
            for stage, s in stages.items()
        ],
    )
    headers = (
        ["stage"]
        + [f"s, N={n:,}" for n in sizes]
        + ["ms/image (marginal)", "fixed s (fit)", "R^2", "line misses by", "linear"]
    )
    report.table(
        f"Wall time per stage (import floor {floors['train_cnn']['seconds']:.1f} s with "
        f"TensorFlow, {floors['split']['seconds']:.1f} s without); inputs "
        f"{image_size}x{image_size}, {params['train_cnn']['epochs']} training epochs; "
        "train_cnn and extract_features: the fastest of "
        f"{repeats} run{'s' if repeats > 1 else ''}",
        headers,
        [
            [stage]
            + [s["seconds"][n] for n in sizes]
            + [
                s["ms_per_image_marginal"],
                None if s["time_fit"] is None else s["time_fit"]["intercept"],
                None if s["time_fit"] is None else f"{s['time_fit']['r2']:.3f}",
                None
                if s["time_fit"] is None
                else f"{100 * s['time_fit']['max_relative_miss']:.0f}%",
                s["time_linear"],
            ]
            for stage, s in stages.items()
        ],
    )
    if head_feeding:
        report.table(
            f"train_head's feeding on N images' features of {args.feature_dim} "
            f"({repo_config().features.dtype} as stored; the configured split of N), "
            f"{params['head']['epochs']} epochs, each way its own process",
            ["N", "train + validation vectors"]
            + [f"peak MiB, {label}" for label in HEAD_FEEDINGS.values()]
            + ["peak, before / now"]
            + [f"s, {label}" for label in HEAD_FEEDINGS.values()],
            [
                [
                    n,
                    f"{run['train']:,} + {run['validation']:,}",
                    *(head_feeding[f][n]["peak_rss_mib"] for f in HEAD_FEEDINGS),
                    f"{report.results['head_feeding_peak_rows_over_indices'][n]:.2f}x",
                    *(head_feeding[f][n]["seconds"] for f in HEAD_FEEDINGS),
                ]
                for n, run in head_feeding["indices"].items()
            ],
        )
    report.target(
        "train_cnn and extract_features peaks flat",
        report.results["training_and_extraction_peaks_flat"],
        f"growth <= {FLAT_GROWTH:g}x",
        report.results["training_and_extraction_peaks_flat"],
        unit="",
    )
    report.target(
        "train_cnn and extract_features time linear",
        report.results["training_and_extraction_time_linear"],
        f"a line within {100 * LINEAR_TOLERANCE:.0f}% of every N",
        report.results["training_and_extraction_time_linear"],
        unit="",
    )
    return report.write(args.out)


if __name__ == "__main__":
    main()
