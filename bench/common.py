"""What every benchmark shares: arguments, machine facts, timing, images, FLOPs, and reports.

Importing this module does not import TensorFlow; the helpers that need it import it inside.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline import archives
from pipeline.config import Config, load_config
from pipeline.devices import cpu_flags, cpu_has_bf16, cpu_info
from pipeline.images import LabeledImage, find_labeled_images

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_IMAGES = (REPO_ROOT / ".." / "shared" / "data" / "dogs-vs-cats-sample-1000.zip").resolve()
DEFAULT_OUT = REPO_ROOT / "bench" / "results"

# The flags that decide which fast paths TensorFlow's oneDNN kernels can take on this CPU.
RELEVANT_FLAGS = (
    "avx2",
    "fma",
    "avx512f",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
)


# --- arguments ------------------------------------------------------------------------------


def base_parser(description: str, images: bool = True) -> argparse.ArgumentParser:
    """The arguments every benchmark takes; each adds its own knobs."""
    parser = argparse.ArgumentParser(description=description)
    if images:
        parser.add_argument(
            "--images",
            type=Path,
            default=DEFAULT_IMAGES,
            help="a .zip/.tar(.gz) or folder of Kaggle-layout images (default: %(default)s)",
        )
    parser.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        help="folder for <name>.json and <name>.md (default: %(default)s)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="tiny sizes: a smoke run of the code, not a figure"
    )
    return parser


def add_workdir_argument(parser: argparse.ArgumentParser) -> None:
    """`--workdir`: where a benchmark makes its throwaway copies, created when missing."""
    parser.add_argument(
        "--workdir", type=made_dir, help="where to make its copies (default: a temp dir)"
    )


def made_dir(text: str) -> Path:
    path = Path(text).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise argparse.ArgumentTypeError(f"cannot create {path}: {error.strerror}") from None
    return path


def repo_config() -> Config:
    """This repository's `params.yaml`, the configuration the benchmarks measure."""
    return load_config(REPO_ROOT / "params.yaml")


def dvc_stages(root: Path = REPO_ROOT) -> dict[str, str]:
    """The stages of `root/dvc.yaml` in the order written (an order DVC can run), with cmds."""
    import yaml

    stages = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    return {name: stage["cmd"] for name, stage in stages.items()}


# --- the machine ----------------------------------------------------------------------------


def _physical_cores() -> int | None:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    cores, physical = set(), None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "physical id":
            physical = value.strip()
        elif key == "core id":
            cores.add((physical, value.strip()))
    return len(cores) or None


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _cpu_quota() -> float | None:
    """Cores allowed by the cgroup (v2 `cpu.max`), if limited."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
    except (OSError, ValueError):
        return None
    return None if quota == "max" else int(quota) / int(period)


def machine_info() -> dict[str, Any]:
    """The facts a reader needs to compare figures: CPU, cores, flags, versions, load."""
    import psutil

    flags = cpu_flags()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu_model": cpu_info().get("model name", platform.processor() or "unknown"),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": usable,
        "physical_cores": _physical_cores(),
        "cgroup_cpu_quota": _cpu_quota(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "cpu_flags": {flag: flag in flags for flag in RELEVANT_FLAGS},
        "bf16_native": cpu_has_bf16(flags),
        "amx": any(flag.startswith("amx") for flag in flags),
        "tensorflow": _version("tensorflow"),
        "keras": _version("keras"),
        "dvc": _version("dvc"),
        "mlflow": _version("mlflow"),
        "numpy": _version("numpy"),
        "python": platform.python_version(),
        "os": platform.platform(),
        "onednn": os.environ.get("TF_ENABLE_ONEDNN_OPTS", "default (on)"),
        # Other processes' load skews every figure on a shared machine; ratios taken side by
        # side in one run suffer least, which is why each benchmark reports ratios.
        "load_average_1m_at_start": round(os.getloadavg()[0], 2),
    }


def machine_line(info: dict[str, Any]) -> str:
    def yes(flag: bool) -> str:
        return "yes" if flag else "no"

    flags = info["cpu_flags"]
    return (
        f"{info['cpu_model']}, {info['usable_cpus']} cores usable "
        f"({info['physical_cores'] or '?'} physical), {info['memory_gib']} GiB RAM; "
        f"TF {info['tensorflow']}, Keras {info['keras']}; "
        f"avx512f {yes(flags['avx512f'])}, avx512_bf16 {yes(flags['avx512_bf16'])}, "
        f"amx {yes(info['amx'])}; load average {info['load_average_1m_at_start']} at start"
    )


# --- timing ---------------------------------------------------------------------------------


class Timer:
    """`with Timer() as t: ...` then `t.seconds`: wall time on the monotonic clock."""

    seconds: float = 0.0

    def __enter__(self) -> Timer:
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.seconds = time.perf_counter() - self._start


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """`(seconds, result)` of one call."""
    with Timer() as timer:
        result = fn()
    return timer.seconds, result


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def pct(share: float | None) -> str:
    """A share of 1 as a percentage for tables: 0.123 -> '12.3%'."""
    return "-" if share is None else f"{100 * share:.1f}%"


# --- images ---------------------------------------------------------------------------------


def prepare_images(source: Path, workdir: Path, limit: int | None = None) -> list[LabeledImage]:
    """The labelled images of a folder or archive, extracted under `workdir` if needed.

    With `limit`, an equal number of cats and dogs (the lowest-sorting names of each), so
    every approach in a benchmark reads exactly the same files.
    """
    source = source.expanduser().resolve()
    if source.is_dir():
        root = source
    elif source.is_file() and archives.is_archive(source):
        root = workdir / "images"
        root.mkdir(parents=True, exist_ok=True)
        archives.extract(source, root)
        archives.extract_nested(root)
    else:
        raise SystemExit(f"--images {source}: not a folder or a .zip/.tar(.gz) archive")
    images, _unlabeled = find_labeled_images(root)
    if not images:
        raise SystemExit(f"--images {source}: no cat or dog images found")
    if limit is not None and limit < len(images):
        by_label = {label: [i for i in images if i.label == label] for label in (0, 1)}
        half = limit // 2
        images = by_label[0][: limit - half] + by_label[1][:half]
    return images


def decode_all(
    images: Sequence[LabeledImage], image_size: Sequence[int]
) -> tuple[np.ndarray, np.ndarray]:
    """Every image decoded by the pipeline's own `image_dataset`: float32 0-255, and labels."""
    from pipeline.datasets import image_dataset

    xs, ys = [], []
    for x, y in image_dataset(images, image_size, 64):
        xs.append(x.numpy())
        ys.append(y.numpy())
    return np.concatenate(xs), np.concatenate(ys)


def write_synthetic_images(root: Path, n: int, size: int = 128) -> Path:
    """`n` generated JPEGs in Kaggle's layout, half cats, half dogs: the tests' images."""
    from devtools.fakes import write_kaggle_tree

    write_kaggle_tree(root, per_class=n // 2, size=(size, size))
    return root


def path_bytes(path: Path) -> int:
    """Apparent size of a file, or of every file below a folder."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


# --- compute --------------------------------------------------------------------------------


def matmul_peak_gflops(n: int = 4096, repeats: int = 5, warmup_s: float = 2.0) -> dict[str, float]:
    """This CPU's float32 peak as TensorFlow reaches it: the best of `repeats` n x n matmuls.

    A compiled function, warmed up for `warmup_s` first: the first eager matmuls run
    20-30% slower while thread pools spin up and the clock ramps, which made the "peak"
    lower than what the convolutions then reached.
    """
    import tensorflow as tf

    a = tf.random.uniform((n, n), dtype=tf.float32)
    b = tf.random.uniform((n, n), dtype=tf.float32)
    matmul = tf.function(lambda: tf.reduce_sum(tf.linalg.matmul(a, b)), autograph=False)
    deadline = time.perf_counter() + warmup_s
    while time.perf_counter() < deadline:
        matmul().numpy()
    times = []
    for _ in range(repeats):
        seconds, _ = timed(lambda: matmul().numpy())
        times.append(seconds)
    best = min(times)
    return {"n": n, "repeats": repeats, "best_s": best, "gflops": 2 * n**3 / best / 1e9}


def _output_shape(layer) -> tuple[int, ...]:
    return tuple(int(d) for d in layer.output.shape[1:])


def model_flops(model) -> dict[str, float]:
    """Forward FLOPs per image of the convolutions and dense layers, from layer shapes.

    A multiply-add counts as 2 FLOPs. Batch norm, activations and pooling are left out:
    they are a few FLOPs per activation, memory-bound, and no matmul unit speeds them up.
    Nested models (VGG16 inside the backbone) are walked into.
    """
    import keras

    counts = {"conv": 0.0, "dense": 0.0}

    def walk(m: keras.Model) -> None:
        for layer in m.layers:
            if isinstance(layer, keras.Model):
                walk(layer)
            elif isinstance(layer, keras.layers.Conv2D):
                kh, kw, c_in, c_out = (int(d) for d in layer.kernel.shape)
                h, w, _ = _output_shape(layer)
                counts["conv"] += 2.0 * h * w * kh * kw * c_in * c_out
            elif isinstance(layer, keras.layers.Dense):
                c_in, c_out = (int(d) for d in layer.kernel.shape)
                positions = int(np.prod(_output_shape(layer)[:-1]))
                counts["dense"] += 2.0 * positions * c_in * c_out

    walk(model)
    return {**counts, "total": counts["conv"] + counts["dense"]}


# --- reports --------------------------------------------------------------------------------


def fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if value == 0:
            return "0"
        if abs(value) >= 100:
            return f"{value:,.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        if abs(value) >= 0.01:
            return f"{value:.2f}"
        return f"{value:.2g}"
    return str(value)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Cells as `fmt` writes them, kept as text: tabulate would read `1,234` again."""
    cells = pd.DataFrame([[fmt(cell) for cell in row] for row in rows], columns=list(headers))
    return cells.to_markdown(index=False, disable_numparse=True)


@dataclass
class Report:
    """One benchmark run: settings, measured results, targets, and the tables that show them."""

    name: str
    title: str
    quick: bool = False
    module: str = ""  # bench.<module> when the result's name is not the module's (accuracy-...)
    machine: dict[str, Any] = field(default_factory=machine_info)
    settings: dict[str, Any] = field(default_factory=dict)
    results: dict[str, Any] = field(default_factory=dict)
    targets: dict[str, dict[str, Any]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    tables: list[tuple[str, str]] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)
    started_at: str = field(
        default_factory=lambda: dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    )

    def table(self, title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        self.tables.append((title, markdown_table(headers, rows)))

    def target(
        self, name: str, measured: float | bool | None, goal: str, met: bool | None, unit: str = "x"
    ) -> None:
        """A figure the issue sets a target for; `met` is None where it cannot be measured."""
        self.targets[name] = {"measured": measured, "goal": goal, "met": met, "unit": unit}

    def as_dict(self) -> dict[str, Any]:
        return {
            "benchmark": self.name,
            "title": self.title,
            "command": f"python -m bench.{self.module or self.name} {shlex.join(sys.argv[1:])}",
            "quick": self.quick,
            "started_at": self.started_at,
            "wall_s": time.perf_counter() - self.started,
            "machine": self.machine,
            "settings": self.settings,
            "results": self.results,
            "targets": self.targets,
            "notes": self.notes,
        }

    def markdown(self, data: dict[str, Any]) -> str:
        parts = [
            f"## {self.title}",
            "",
            f"Machine: {machine_line(self.machine)}",
            "",
            f"Command: `{data['command'].strip()}`"
            + (" (quick: smoke sizes)" if self.quick else ""),
        ]
        for title, table in self.tables:
            parts += ["", f"**{title}**", "", table]
        if self.targets:
            rows = [
                [
                    name,
                    t["goal"],
                    fmt(t["measured"]) + (t["unit"] if _is_number(t["measured"]) else ""),
                    "-" if t["met"] is None else fmt(t["met"]),
                ]
                for name, t in self.targets.items()
            ]
            parts += [
                "",
                "**Targets**",
                "",
                markdown_table(["figure", "target", "measured", "met"], rows),
            ]
        if self.notes:
            parts += [""] + [f"- {note}" for note in self.notes]
        parts.append(f"\nTotal benchmark time: {data['wall_s']:.0f} s.")
        return "\n".join(parts) + "\n"

    def write(self, out: Path) -> Path:
        """Writes `<out>/<name>.json` and `.md`, prints the Markdown, returns the JSON path."""
        out.mkdir(parents=True, exist_ok=True)
        data = self.as_dict()
        json_path = out / f"{self.name}.json"
        json_path.write_text(json.dumps(data, indent=2, default=_json_default) + "\n")
        text = self.markdown(data)
        (out / f"{self.name}.md").write_text(text)
        print(text, flush=True)
        return json_path


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")
