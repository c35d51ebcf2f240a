"""The README's accuracy figure, drawn from the measured rows in `bench/accuracy.csv`.

Left: the learning curve, each recipe's test accuracy against the training images.
Right: each recipe's test accuracy against train_cnn's wall time on the full archive. Error
bars are the 95% Wilson intervals `evaluate` reports. Each row of the CSV is one
`python -m bench.accuracy` result, with its command and machine.

    python -m bench.plot_accuracy [--csv bench/accuracy.csv] [--out docs/accuracy.png]
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from bench.common import REPO_ROOT

COLUMNS = (
    "date",
    "recipe",
    "training_images",
    "test_images",
    "test_accuracy",
    "ci_low",
    "ci_high",
    "without_tta",
    "train_cnn_min",
    "run_min",
    "machine",
    "command",
)


def read_results(path: Path) -> pd.DataFrame:
    results = pd.read_csv(path)
    missing = set(COLUMNS) - set(results.columns)
    if missing:
        raise SystemExit(f"plot_accuracy: {path} lacks the columns {sorted(missing)}")
    return results


def accuracy_figure(results: pd.DataFrame, full_size: int) -> Figure:
    """Learning curves; accuracy against train_cnn's time at `full_size` training images."""
    figure = Figure(figsize=(10, 4), layout="constrained")
    curve, timing = figure.subplots(1, 2)
    for recipe, rows in results.sort_values("training_images").groupby("recipe"):
        curve.errorbar(
            rows["training_images"],
            rows["test_accuracy"],
            yerr=errors(rows),
            marker="o",
            capsize=3,
            label=recipe,
        )
    curve.legend()
    curve.set(
        xscale="log",
        xlabel="training images (log scale)",
        ylabel="test accuracy (95% CI)",
        title="Learning curve",
    )
    full = results[(results["training_images"] == full_size) & results["train_cnn_min"].notna()]
    for recipe, rows in full.groupby("recipe"):
        timing.errorbar(
            rows["train_cnn_min"], rows["test_accuracy"], yerr=errors(rows), marker="o", capsize=3
        )
        for _, row in rows.iterrows():
            timing.annotate(recipe, (row["train_cnn_min"], row["test_accuracy"]), xytext=(5, 5),
                            textcoords="offset points")  # fmt: skip
    timing.set(
        xlabel="train_cnn wall time (min)",
        ylabel="test accuracy (95% CI)",
        title=f"Recipes on {full_size:,} training images",
    )
    for axes in (curve, timing):
        axes.grid(alpha=0.3)
    return figure


def errors(rows: pd.DataFrame) -> list[pd.Series]:
    return [rows["test_accuracy"] - rows["ci_low"], rows["ci_high"] - rows["test_accuracy"]]


def main(argv: Sequence[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--csv", type=Path, default=REPO_ROOT / "bench" / "accuracy.csv")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "docs" / "accuracy.png")
    args = parser.parse_args(argv)
    results = read_results(args.csv)
    full_size = int(results["training_images"].max())
    accuracy_figure(results, full_size).savefig(args.out, dpi=80)
    print(f"plot_accuracy: {len(results)} results drawn into {args.out}")
    return args.out


if __name__ == "__main__":
    main()
