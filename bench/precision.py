"""Mixed bfloat16 against float32 on this CPU: the stages' time and the models' accuracy.

What `compute.precision: auto` decides on a CPU with AVX512-BF16 or AMX, measured on a
throwaway copy (`devtools.pipeline_copy.PipelineCopy`) with the repository's params and
`features.weights: none`, or the tests' small params with `--quick`. `dvc repro augment`
prepares the splits and the augmented variants once. Then, for each seed in `--seeds`, the
stages run as their own processes, as DVC runs them, with `common.seed` and
`compute.precision` set:

- `train_cnn` under float32, then under mixed_bfloat16;
- `extract_features` under each policy (once, at seed 0: its cost does not depend on it), and
  after each, `train_head` in float32 on those features; on the bfloat16 features also
  `train_head` under mixed_bfloat16, the choice `auto` does not make.

Reported per run: the stage's wall time (process start-up included) and the best epoch's
validation accuracy and loss; then the means over the seeds, and the speed-ups. On a CPU
without native bfloat16 it reports that and measures nothing: TensorFlow would emulate it.

    python -m bench.precision [--images DIR_OR_ZIP] [--seeds 1 2 3] [--out bench/results]
                              [--quick] [--force]
"""

from __future__ import annotations

import json
import shutil
import statistics
import tempfile
from collections.abc import Sequence
from pathlib import Path

from bench.common import Report, base_parser, ratio, timed
from pipeline.devices import cpu_has_bf16

POLICIES = ("float32", "mixed_bfloat16")


def run_stage(copy, stage: str, seed: int, precision: str) -> dict[str, float]:
    """One stage as its own process under `precision`; its seconds and validation metrics."""
    copy.set_param("common", "seed", seed)
    copy.set_param("compute", "precision", precision)
    seconds, _ = timed(lambda: copy.run(copy.python, "-m", f"pipeline.{stage}"))
    metrics_file = copy.root / "reports" / stage / "metrics.json"
    metrics = json.loads(metrics_file.read_text()) if stage != "extract_features" else {}
    return {
        "seconds": seconds,
        "val_accuracy": metrics.get("val/accuracy"),
        "val_loss": metrics.get("val/loss"),
    }


def mean_of(runs: Sequence[dict[str, float]], key: str) -> float | None:
    values = [run[key] for run in runs if run.get(key) is not None]
    return statistics.fmean(values) if values else None


def measure(copy, seeds: Sequence[int]) -> dict[str, list[dict[str, float]]]:
    """Every run, keyed by what ran: `<stage> <policy>`, the head also by its features'."""
    runs: dict[str, list[dict[str, float]]] = {}

    def record(name: str, run: dict[str, float], seed: int) -> None:
        runs.setdefault(name, []).append({"seed": seed, **run})

    for seed in seeds:
        for policy in POLICIES:
            record(f"train_cnn, {policy}", run_stage(copy, "train_cnn", seed, policy), seed)
    for policy in POLICIES:
        record(f"extract_features, {policy}", run_stage(copy, "extract_features", 0, policy), 0)
        heads = ("float32", "mixed_bfloat16") if policy == "mixed_bfloat16" else ("float32",)
        for seed in seeds:
            for head in heads:
                name = f"train_head, {head}, on {policy} features"
                record(name, run_stage(copy, "train_head", seed, head), seed)
    return runs


def main(argv: Sequence[str] | None = None) -> Path:
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", help="common.seed values (default 1 2 3)")
    parser.add_argument(
        "--force", action="store_true", help="measure even where the CPU has no native bfloat16"
    )
    args = parser.parse_args(argv)
    seeds = args.seeds or ([1] if args.quick else [1, 2, 3])

    from devtools.pipeline_copy import PipelineCopy

    report = Report("precision", "Mixed bfloat16 vs. float32 on this CPU", args.quick)
    report.settings = {"seeds": seeds, "images": str(args.images), "bf16_native": cpu_has_bf16()}
    if not cpu_has_bf16() and not args.force:
        report.notes.append(
            "This CPU has neither AVX512-BF16 nor AMX: `auto` keeps float32 here and bfloat16 "
            "would be emulated. Nothing measured (--force measures anyway)."
        )
        return report.write(args.out)

    workdir = Path(tempfile.mkdtemp(prefix="bench-precision-"))
    try:
        copy = PipelineCopy.create(
            workdir,
            args.images.expanduser().resolve(),
            overrides=None if args.quick else {"features": {"weights": "none"}},
            tiny=args.quick,
        )
        copy.dvc("repro", "augment")
        runs = measure(copy, seeds)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    summary = {
        name: {key: mean_of(group, key) for key in ("seconds", "val_accuracy", "val_loss")}
        for name, group in runs.items()
    }
    report.results = {"runs": runs, "means": summary}
    report.table(
        f"Each run: the stage as its own process, seeds {', '.join(map(str, seeds))}",
        ["run", "seed", "seconds", "val. accuracy", "val. loss"],
        [
            [name, run["seed"], run["seconds"], run["val_accuracy"], run["val_loss"]]
            for name, group in runs.items()
            for run in group
        ],
    )
    report.table(
        "Means over the seeds",
        ["run", "seconds", "val. accuracy", "val. loss"],
        [[name, m["seconds"], m["val_accuracy"], m["val_loss"]] for name, m in summary.items()],
    )
    speedups = {
        stage: ratio(
            summary[f"{stage}, float32{suffix}"]["seconds"],
            summary[f"{stage}, mixed_bfloat16{suffix}"]["seconds"],
        )
        for stage, suffix in (("train_cnn", ""), ("extract_features", ""))
    }
    report.results["speedups"] = speedups
    report.table(
        "float32 seconds / mixed_bfloat16 seconds",
        ["stage", "speed-up"],
        [[stage, f"{value:.2f}x" if value else "-"] for stage, value in speedups.items()],
    )
    return report.write(args.out)


if __name__ == "__main__":
    main()
