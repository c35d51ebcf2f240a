"""Wall time of `dvc repro` on a throwaway copy: from scratch, then after small edits.

The copy is `devtools.pipeline_copy.PipelineCopy`: this repository's files and params.yaml
(`--params repo`, the default; with `features.weights: none`, since the ImageNet weights
cannot be assumed downloadable, and cost the same FLOPs) or the tests' small params
(`--params tests`, the default with `--quick`), and `download.source: local` pointing at
`--images`. Four runs, one after the
other: from scratch; with nothing changed; after a `head` param edit; after a `train_cnn`
param edit (which must not re-run `augment`). Each is reported as a ratio to the
from-scratch time, with the stages DVC ran and the time spent inside them (their MLflow
runs' durations), so the rest is process start-up and DVC's own work.

`--copies K` uses each image K times: the original, then copies mirrored, shifted and
re-encoded, to see how the ratios move as the dataset grows. A stand-in for more real
images: near-duplicates land in different splits, so the accuracies mean nothing there; the
times do.

    python -m bench.incremental [--images DIR_OR_ZIP] [--copies K] [--out bench/results] [--quick]
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

import numpy as np
import yaml

from bench.common import (
    REPO_ROOT,
    Report,
    Timer,
    add_workdir_argument,
    base_parser,
    dvc_stages,
    ratio,
    timed,
)

NO_OP_TARGET_S = 5.0
HEAD_EDIT_TARGET = 0.05
PARAMS_DESCRIPTIONS = {
    "repo": "the repository's params.yaml (features.weights: none)",
    "tests": "the tests' small params",
}
STAGE_TAG = "pipeline.stage"
COPY_QUALITY = 90  # --copies re-encodes at this JPEG quality
COPY_ID_STRIDE = 1_000_000  # copy k of image i is <class>.<k * stride + i>.jpg
PARENT_STAGE = "pipeline"  # the tag value of the run that groups one execution's stages


def copied_archive(source: Path, copies: int, workdir: Path) -> Path:
    """The images of `source`, each `copies` times, into a stored zip in the Kaggle layout.

    Copy 0 is the original; copy k mirrors the image when k is odd and shifts it by 3k and
    2k pixels (wrapping around), then re-encodes it, so no two files are the same.
    """
    import zipfile

    from PIL import Image, ImageChops, ImageOps

    from bench.common import prepare_images
    from devtools.fakes import jpeg_bytes

    target = workdir / f"copies-{copies}.zip"
    with zipfile.ZipFile(target, "w", zipfile.ZIP_STORED) as archive:
        for index, image in enumerate(prepare_images(source, workdir / "original")):
            name = "dog" if image.label else "cat"
            archive.write(image.path, f"train/{name}.{index}.jpg")
            with Image.open(image.path) as opened:
                original = opened.convert("RGB")
            for k in range(1, copies):
                variant = ImageChops.offset(original, 3 * k, 2 * k)
                if k % 2:
                    variant = ImageOps.mirror(variant)
                archive.writestr(
                    f"train/{name}.{k * COPY_ID_STRIDE + index}.jpg",
                    jpeg_bytes(variant, quality=COPY_QUALITY),
                )
    return target


def planned_edits(
    params: dict[str, dict], cnn_edit: bool = True
) -> dict[str, tuple[str, str, float] | None]:
    """The runs in order, by name, each with the `(section, key, value)` edit made before it."""
    head_lr = params["head"]["learning_rate"]
    edits: dict[str, tuple[str, str, float] | None] = {
        "from scratch": None,
        "nothing changed": None,
        f"head.learning_rate -> {head_lr * 10:g}": ("head", "learning_rate", head_lr * 10),
    }
    if cnn_edit:
        dropout = 0.4 if params["train_cnn"]["dropout"] != 0.4 else 0.3
        edits[f"train_cnn.dropout -> {dropout:g}"] = ("train_cnn", "dropout", dropout)
    return edits


def stages_run(output: str) -> list[str]:
    return re.findall(r"Running stage '([\w-]+)'", output)


def stage_seconds(copy, seen: set[str]) -> dict[str, float]:
    """Seconds inside each stage's MLflow run among the runs not in `seen` (then adds them)."""
    client, experiment = copy.mlflow()
    durations: dict[str, float] = {}
    for run in client.search_runs([experiment.experiment_id], max_results=1000):
        if run.info.run_id in seen:
            continue
        seen.add(run.info.run_id)
        stage = run.data.tags.get(STAGE_TAG)
        if stage and stage != PARENT_STAGE and run.info.end_time:
            durations[stage] = (run.info.end_time - run.info.start_time) / 1000
    return durations


def probe_overheads() -> None:
    """Run in a fresh interpreter: what a training stage pays besides its own work.

    Prints JSON: seconds to import TensorFlow+Keras and MLflow, and to log a small Keras
    model to MLflow with its pip requirements inferred (MLflow's default) and given (as the
    stages log).
    """
    with Timer() as keras_import:
        import keras
    with Timer() as mlflow_import:
        import mlflow
        import mlflow.keras
        from mlflow.models import infer_signature
    from bench.common import repo_config
    from pipeline.cnn import build_cnn
    from pipeline.precision import for_inference

    cfg = repo_config().train_cnn.model_copy(update={"image_size": (32, 32)})
    model = for_inference(build_cnn(cfg))  # uncompiled, as the stages log their models
    example = np.zeros((1, 32, 32, 3), dtype=np.float32)
    mlflow.set_tracking_uri(f"sqlite:///{Path.cwd() / 'mlflow.db'}")
    mlflow.set_experiment("bench-overheads")
    requirements = [f"{name}=={metadata.version(name)}" for name in ("tensorflow", "keras")]
    with mlflow.start_run():
        signature = infer_signature(example, model.predict(example, verbose=0))
        with Timer() as inferred:
            mlflow.keras.log_model(model, name="inferred", signature=signature)
        with Timer() as given:
            mlflow.keras.log_model(
                model, name="given", signature=signature, pip_requirements=requirements
            )
    del keras
    print(
        json.dumps(
            {
                "import_tensorflow_keras_s": keras_import.seconds,
                "import_mlflow_s": mlflow_import.seconds,
                "log_model_requirements_inferred_s": inferred.seconds,
                "log_model_requirements_given_s": given.seconds,
            }
        )
    )


def probe_stage_end(as_the_stages: bool) -> None:
    """Run in a fresh interpreter: how long a training stage takes to end once its work is done.

    Fits a small model inside an MLflow run, logging each epoch, and prints JSON: the seconds
    one synchronous `log_metrics` of an epoch's metrics takes (mean of 20), the seconds
    `end_run` took, and the wall-clock time it printed at, from which the caller takes the
    process's exit time. `as_the_stages`: `EpochMetricsCallback` and `process.run`, as the
    stages do; otherwise MLflow's own callback and Python's default exit.
    """
    import keras
    import mlflow
    import mlflow.keras

    from pipeline import process
    from pipeline.training import EpochMetricsCallback

    def main() -> None:
        model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(1, activation="sigmoid")])
        model.compile(optimizer="adam", loss="binary_crossentropy", metrics=["accuracy"])
        data = np.zeros((256, 64), dtype=np.float32), np.zeros(256, dtype=np.float32)
        callback = EpochMetricsCallback() if as_the_stages else mlflow.keras.MlflowCallback()
        mlflow.set_tracking_uri(f"sqlite:///{Path.cwd() / 'mlflow.db'}")
        mlflow.set_experiment("bench-stage-end")
        mlflow.start_run()
        history = model.fit(*data, validation_data=data, epochs=5, callbacks=[callback], verbose=0)
        epoch_metrics = {name: values[-1] for name, values in history.history.items()}
        with Timer() as writes:
            for step in range(5, 25):
                mlflow.log_metrics(epoch_metrics, step=step)
        with Timer() as end_run:
            mlflow.end_run()
        probe = {"log_metrics_s": writes.seconds / 20, "end_run_s": end_run.seconds}
        print(json.dumps({**probe, "printed_at": time.time()}), flush=True)

    if as_the_stages:
        process.run(main)
    else:
        main()


def in_fresh_interpreter(command: str) -> tuple[float, str, float]:
    """Runs `python -c command` in a clean environment.

    Returns the seconds it took, its last line of stdout, and the wall-clock time it exited at.
    """
    from devtools.pipeline_copy import probe_env

    with tempfile.TemporaryDirectory(prefix="bench-overheads-") as probe:
        with Timer() as total:
            result = subprocess.run(
                [sys.executable, "-c", command],
                cwd=probe,
                env=probe_env(REPO_ROOT),
                capture_output=True,
                text=True,
                check=True,
                timeout=900,
            )
        exited_at = time.time()
    return total.seconds, result.stdout.strip().splitlines()[-1], exited_at


def measure_overheads(repeats: int = 2) -> dict[str, float]:
    seconds, output, _ = in_fresh_interpreter(
        "from bench.incremental import probe_overheads; probe_overheads()"
    )
    overheads = {**json.loads(output), "process_total_s": seconds}
    # The two ways alternate, each going first in turn, and the best of `repeats` is kept:
    # what each way costs, with a busy machine's noise left out as far as it can be.
    ways = [(False, "defaults"), (True, "stages")]
    for repeat in range(repeats):
        for as_the_stages, label in ways if repeat % 2 == 0 else ways[::-1]:
            _, output, exited_at = in_fresh_interpreter(
                f"from bench.incremental import probe_stage_end; probe_stage_end({as_the_stages})"
            )
            probe = json.loads(output)
            for name, value in (
                ("log_metrics_synchronous_s", probe["log_metrics_s"]),
                (f"end_run_{label}_s", probe["end_run_s"]),
                (f"exit_{label}_s", exited_at - probe["printed_at"]),
            ):
                overheads[name] = min(value, overheads.get(name, float("inf")))
    return overheads


def main(argv: Sequence[str] | None = None) -> Path:
    parser = base_parser(__doc__.split("\n\n")[0])
    add_workdir_argument(parser)
    parser.add_argument("--keep", action="store_true", help="keep the copy afterwards")
    parser.add_argument(
        "--params",
        choices=("repo", "tests"),
        help="params.yaml as the repository has it, or the tests' small one "
        "(default: repo; tests with --quick)",
    )
    parser.add_argument(
        "--copies",
        type=int,
        default=1,
        help="use each image this many times, mirrored and shifted (default: %(default)s)",
    )
    parser.add_argument(
        "--no-cnn-edit",
        action="store_true",
        help="skip the train_cnn edit, which retrains the CNN: at full size (--copies 25) "
        "most of a from-scratch run again",
    )
    args = parser.parse_args(argv)
    if args.copies < 1:
        parser.error(f"--copies {args.copies}: expected 1 or more")
    which_params = args.params or ("tests" if args.quick else "repo")

    from devtools.pipeline_copy import PipelineCopy

    report = Report("incremental", "Incremental re-runs: dvc repro wall time", args.quick)
    source = images = args.images.expanduser().resolve()
    workdir = Path(tempfile.mkdtemp(prefix="bench-incremental-", dir=args.workdir))
    copied = Path(tempfile.mkdtemp(prefix="bench-incremental-images-", dir=args.workdir))
    try:
        if args.copies > 1:
            images = copied_archive(images, args.copies, copied)
        copy = PipelineCopy.create(
            workdir,
            images,
            overrides=None if which_params == "tests" else {"features": {"weights": "none"}},
            tiny=which_params == "tests",
        )
        copy.timeout_s = None  # at Kaggle's size (--copies 25) a run takes most of an hour
        params = yaml.safe_load((workdir / "params.yaml").read_text())
        edits = planned_edits(params, cnn_edit=not args.no_cnn_edit)
        seen: set[str] = set()
        steps: dict[str, dict] = {}
        for name, edit in edits.items():
            if edit is not None:
                copy.set_param(*edit)
            seconds, output = timed(lambda: copy.dvc("repro"))
            inside = stage_seconds(copy, seen)
            steps[name] = {
                "seconds": seconds,
                "stages_run": stages_run(output),
                "stage_seconds": inside,
                "inside_stages_s": sum(inside.values()),
            }
        overheads = measure_overheads(repeats=1 if args.quick else 2)
    finally:
        if args.keep:
            images_kept = f" (its images in {copied})" if args.copies > 1 else ""
            print(f"incremental: kept the copy in {workdir}{images_kept}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
            shutil.rmtree(copied, ignore_errors=True)

    scratch = steps["from scratch"]["seconds"]
    for step in steps.values():
        step["ratio_to_scratch"] = ratio(step["seconds"], scratch)
        step["outside_stages_s"] = step["seconds"] - step["inside_stages_s"]
    cnn_step = None if args.no_cnn_edit else list(steps.values())[-1]
    augment_reran = None if cnn_step is None else "augment" in cnn_step["stages_run"]
    report.settings = {
        "params": which_params,
        "params_yaml": params,
        "images": str(source),
        "copies": args.copies,
    }
    report.results = {
        "steps": steps,
        "augment_reran_after_train_cnn_edit": augment_reran,
        "overheads": overheads,
        "from_scratch_s": scratch,
        "kept_copy": str(workdir) if args.keep else None,
    }
    copies = "" if args.copies == 1 else f", each image {args.copies} times (--copies)"
    report.table(
        f"dvc repro on a copy with {PARAMS_DESCRIPTIONS[which_params]}{copies}, "
        "one run after the other",
        ["run", "stages run", "wall s", "x from scratch", "inside stages s", "outside s"],
        [
            [
                name,
                ", ".join(step["stages_run"]) or "none",
                step["seconds"],
                f"{step['ratio_to_scratch']:.2f}x",
                step["inside_stages_s"],
                step["outside_stages_s"],
            ]
            for name, step in steps.items()
        ],
    )
    report.table(
        "Time inside each stage of the from-scratch run (its MLflow run's duration)",
        ["stage", "seconds"],
        [
            [stage, steps["from scratch"]["stage_seconds"].get(stage)]
            for stage in dvc_stages()
            if stage in steps["from scratch"]["stage_seconds"]
        ],
    )
    no_op = steps["nothing changed"]["seconds"]
    report.target(
        "nothing changed", no_op, f"<= {NO_OP_TARGET_S:g} s", no_op <= NO_OP_TARGET_S, unit=" s"
    )
    head_ratio = list(steps.values())[2]["ratio_to_scratch"]
    report.target(
        "a head param edit / from scratch",
        head_ratio,
        f"<= {HEAD_EDIT_TARGET:g}x",
        None if head_ratio is None else head_ratio <= HEAD_EDIT_TARGET,
    )
    if augment_reran is not None:
        report.target(
            "augment re-ran after a train_cnn edit", augment_reran, "no", not augment_reran, unit=""
        )
    report.table(
        "Fixed costs every stage pays, measured in a fresh interpreter after the runs",
        ["cost", "seconds"],
        [
            ["import TensorFlow + Keras", overheads["import_tensorflow_keras_s"]],
            ["import MLflow", overheads["import_mlflow_s"]],
            [
                "mlflow.keras.log_model, pip requirements inferred (MLflow's default)",
                overheads["log_model_requirements_inferred_s"],
            ],
            [
                "mlflow.keras.log_model, pip_requirements given (as the stages log)",
                overheads["log_model_requirements_given_s"],
            ],
            [
                "one epoch's metrics logged synchronously (EpochMetricsCallback, once per epoch)",
                overheads["log_metrics_synchronous_s"],
            ],
            [
                "end of an MLflow run after a fit, MLflow's callback (asynchronous logging)",
                overheads["end_run_defaults_s"],
            ],
            [
                "end of an MLflow run after a fit, EpochMetricsCallback (as the stages log)",
                overheads["end_run_stages_s"],
            ],
            ["process exit after that, Python's default", overheads["exit_defaults_s"]],
            [
                "process exit after that, through process.run (as the stages exit)",
                overheads["exit_stages_s"],
            ],
        ],
    )
    return report.write(args.out)


if __name__ == "__main__":
    main()
