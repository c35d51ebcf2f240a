"""Accuracy and wall time of one recipe: a whole `dvc exp run` from scratch in a copy.

The figures of the README's results table: the scratch CNN's test accuracy (with its 95%
Wilson interval, with and without test-time augmentation) and the run's wall time, for a
preset (`presets/<name>.txt`), a stratified subset (`split.n`) and a seed. VGG16 runs with
random weights (`features.weights: none`): no machine here reaches the ImageNet weights, so
the transfer model's figures are a smoke test, not a result.

    python -m bench.accuracy --images ../shared/data/dogs-vs-cats-train-23k.zip
    python -m bench.accuracy --images ../shared/data/dogs-vs-cats-train-23k.zip --n 4000
    python -m bench.accuracy --images ../shared/data/dogs-vs-cats-train-23k.zip --preset fast
    python -m bench.accuracy --images ../shared/data/dogs-vs-cats-train-23k.zip --cnn-only

`--cnn-only` compares scratch-CNN recipes for less: `dvc exp run train_cnn` (the stages up to
it, none of the VGG16 ones), then `python -m pipeline.predict` on the test split, with and
without `--tta`, scored by `evaluate`'s own metrics.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

from bench.common import REPO_ROOT, Report, add_workdir_argument, base_parser, timed
from bench.incremental import stage_seconds

PRESETS = REPO_ROOT / "presets"


def preset_overrides(name: str | None) -> list[str]:
    """The `dvc exp run -S` overrides in `presets/<name>.txt`, as `make pipeline PRESET=` reads."""
    if name is None:
        return []
    lines = (PRESETS / f"{name}.txt").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def test_scores(evaluated: dict, model: str) -> dict[str, float]:
    """One model's test scores from evaluate's metrics.json (`cnn/test/accuracy`), by name."""
    prefix = f"{model}/test/"
    return {k.removeprefix(prefix): v for k, v in evaluated.items() if k.startswith(prefix)}


def main(argv: Sequence[str] | None = None) -> Path:
    parser = base_parser(__doc__.split("\n\n")[0])
    add_workdir_argument(parser)
    parser.add_argument("--preset", help="a presets/<name>.txt (default: params.yaml as it is)")
    parser.add_argument("--n", type=int, help="split.n: a stratified subset of this many images")
    parser.add_argument("--seed", type=int, help="common.seed (default: params.yaml's)")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="more -S overrides"
    )
    parser.add_argument(
        "--cnn-only", action="store_true", help="train_cnn and what it needs, then predict"
    )
    parser.add_argument("--keep", action="store_true", help="keep the copy afterwards")
    args = parser.parse_args(argv)

    from devtools.pipeline_copy import PipelineCopy

    overrides = ["features.weights=none", *preset_overrides(args.preset), *args.set]
    if args.n:
        overrides.append(f"split.n={args.n}")
    if args.seed is not None:
        overrides.append(f"common.seed={args.seed}")
    if args.quick:
        overrides += [f"{k}={v}" for k, v in QUICK.items()]
    parts = (args.preset or "default", args.n or "all", args.seed)
    label = "-".join(str(part) for part in parts if part is not None)
    report = Report(
        f"accuracy-{label}", f"Accuracy and wall time: {label}", args.quick, module="accuracy"
    )
    workdir = Path(tempfile.mkdtemp(prefix="bench-accuracy-", dir=args.workdir))
    try:
        copy = PipelineCopy.create(workdir, args.images.expanduser().resolve(), tiny=False)
        copy.timeout_s = None  # hours at Kaggle's size on a laptop CPU
        command = ["exp", "run", "-n", label]
        for override in overrides:
            command += ["-S", override]
        if args.cnn_only:
            command.append("train_cnn")
        seconds, _ = timed(lambda: copy.dvc(*command))
        stages = stage_seconds(copy, set())
        trained = json.loads((workdir / "reports/train_cnn/metrics.json").read_text())
        split = json.loads((workdir / "reports/split/summary.json").read_text())
        if args.cnn_only:
            # Named as evaluate's metrics.json names them (cnn/test/accuracy).
            evaluated, without_tta = (
                {f"cnn/test/{k}": v for k, v in predicted_test_metrics(copy, tta).items()}
                for tta in (True, False)
            )
        else:
            evaluated = json.loads((workdir / "reports/evaluate/metrics.json").read_text())
            copy.dvc("exp", "run", "-S", "evaluate.tta=false")  # re-runs evaluate alone
            without_tta = json.loads((workdir / "reports/evaluate/metrics.json").read_text())
    finally:
        if args.keep:
            print(f"accuracy: kept the copy in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    cnn = test_scores(evaluated, "cnn")
    report.settings = {"images": str(args.images), "overrides": overrides, "split": split}
    report.results = {
        "wall_s": seconds,
        "stage_seconds": stages,
        "cnn": cnn,
        "cnn_without_tta": test_scores(without_tta, "cnn"),
        "transfer_random_vgg16": test_scores(evaluated, "transfer") or None,
        "train_cnn": trained,
    }
    interval = f"{cnn['accuracy_ci_low']:.3f}-{cnn['accuracy_ci_high']:.3f}"
    report.table(
        "Scratch CNN on the test split",
        ["recipe", "test accuracy (95% CI)", "without TTA", "epochs", "wall time"],
        [
            [
                label,
                f"{cnn['accuracy']:.4f} ({interval})",
                f"{without_tta['cnn/test/accuracy']:.4f}",
                f"{trained.get('best_epoch')} of {trained.get('epochs_run')}",
                f"{seconds / 60:.1f} min (train_cnn {stages.get('train_cnn', 0) / 60:.1f})",
            ]
        ],
    )
    return report.write(args.out)


def predicted_test_metrics(copy, tta: bool) -> dict[str, float]:
    """`evaluate`'s metrics of models/cnn.keras on the test split, through `pipeline.predict`."""
    import pandas as pd

    from pipeline.evaluate import classification_metrics

    out = copy.root / f"test-predictions-tta-{tta}.csv"
    flags = ["--tta"] if tta else []
    copy.run(
        copy.python, "-m", "pipeline.predict", "--model", "models/cnn.keras", *flags,
        "--out", str(out), "data/split/test",
    )  # fmt: skip
    predictions = pd.read_csv(out)
    labels = predictions["file"].map(lambda name: int(Path(name).parent.name == "dogs"))
    return classification_metrics(labels.to_numpy(), predictions["prob_dog"].to_numpy(), 0.5)


# --quick: the tests' tiny sizes, a smoke run of this code rather than a figure.
QUICK = {
    "train_cnn.image_size": "[32,32]",
    "train_cnn.stem_filters": 4,
    "train_cnn.block_filters": "[8,8]",
    "train_cnn.top_filters": 8,
    "train_cnn.epochs": 2,
    "features.image_size": "[32,32]",
    "head.epochs": 1,
}


if __name__ == "__main__":
    main()
