"""End to end: `dvc repro` on a copy of this repository with tiny params and generated images."""

from __future__ import annotations

import csv
import json
import re
import time

import keras
import pytest
import yaml
from mlflow.tracking import MlflowClient

from devtools.pipeline_copy import PipelineCopy

pytestmark = pytest.mark.slow

STAGES = (
    "download",
    "split",
    "augment",
    "train_cnn",
    "extract_features",
    "extract_augmented_features",
    "train_head",
    "finetune",
    "evaluate",
    "explain",
)


def stages_run(output: str) -> list[str]:
    return re.findall(r"Running stage '([\w-]+)'", output)


def child_runs(client: MlflowClient, experiment_id: str, parent_id: str) -> list:
    return client.search_runs(
        [experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'"
    )


def test_repro_runs_every_stage_and_logs_each_to_mlflow(tiny_pipeline: PipelineCopy) -> None:
    first = tiny_pipeline.first_repro_output
    ran = stages_run(first)
    assert sorted(ran) == sorted(STAGES)
    assert ran[:2] == ["download", "split"] and ran.index("evaluate") > ran.index("train_head")
    root = tiny_pipeline.root
    for path in ("models/cnn.keras", "models/transfer.keras", "models/head.keras"):
        # Saved for inference: no optimizer, so no optimizer state in the file.
        assert not keras.models.load_model(root / path).compiled
    metrics = json.loads((root / "reports/evaluate/metrics.json").read_text())
    models = ("cnn", "transfer", "finetuned")
    names = ("accuracy", "accuracy_ci_low", "accuracy_ci_high", "precision", "recall", "f1")
    names += ("roc_auc", "log_loss")
    assert set(metrics) == {f"{model}/test/{name}" for model in models for name in names}
    ids = json.loads((root / "reports/evaluate/mlflow.json").read_text())
    assert set(ids) == {"mlflow_run_id", "mlflow_parent_run_id"}
    for model in models:
        # The metric is what the per-image predictions DVC plots say, not a number of its own.
        with (root / f"reports/evaluate/predictions_{model}.csv").open() as handle:
            rows = list(csv.DictReader(handle))
        correct = sum(row["actual"] == row["predicted"] for row in rows)
        assert rows and metrics[f"{model}/test/accuracy"] == pytest.approx(correct / len(rows))
        assert metrics[f"{model}/test/log_loss"] > 0

    client, experiment = tiny_pipeline.mlflow()
    parents = client.search_runs(
        [experiment.experiment_id], filter_string="tags.`pipeline.stage` = 'pipeline'"
    )
    assert len(parents) == 1
    parent = parents[0]
    children = child_runs(client, experiment.experiment_id, parent.info.run_id)
    # Every stage but the augmented features' one, off here (features.include_augmented).
    logged = sorted(set(STAGES) - {"extract_augmented_features"})
    assert sorted(run.data.tags["pipeline.stage"] for run in children) == logged
    by_stage = {run.data.tags["pipeline.stage"]: run for run in children}
    assert by_stage["train_head"].data.params["head.learning_rate"] == "0.0001"
    assert "val/loss" in by_stage["train_cnn"].data.metrics
    for stage in ("train_cnn", "extract_features", "train_head", "finetune"):
        assert "system/cpu_utilization_percentage" in by_stage[stage].data.metrics, stage
    history = client.get_metric_history(by_stage["train_cnn"].info.run_id, "val/loss")
    assert [m.step for m in history] == [1, 2]  # one point per epoch, counted from 1
    assert not any(name.startswith("optimizer_") for name in by_stage["train_cnn"].data.params)
    for stage, run in by_stage.items():  # each run has its stage's report folder, all of it
        listed = {a.path for a in client.list_artifacts(run.info.run_id, "reports")}
        folder = root / "reports" / stage
        assert listed == {f"reports/{path.name}" for path in folder.iterdir()}, stage
    assert "reports/mlflow.json" in {
        a.path for a in client.list_artifacts(by_stage["train_cnn"].info.run_id, "reports")
    }
    # The final test metrics are on the grouping run too, for MLflow's chart view.
    parent_metrics = client.get_run(parent.info.run_id).data.metrics
    assert parent_metrics["transfer/test/accuracy"] == pytest.approx(
        metrics["transfer/test/accuracy"]
    )
    # ...and the kept weights' validation scores, as reports/train_cnn/metrics.json has them.
    trained = json.loads((root / "reports/train_cnn/metrics.json").read_text())
    assert parent_metrics["cnn/val/accuracy"] == pytest.approx(trained["val/accuracy"])
    assert parent_metrics["cnn/best_epoch"] == trained["best_epoch"]
    for run in children:
        assert run.info.status == "FINISHED"
        assert run.data.tags["git.commit"] == parent.data.tags["git.commit"]


def test_every_file_the_stages_write_is_a_declared_output_and_dvc_reads_every_metric(
    tiny_pipeline: PipelineCopy,
) -> None:
    """dvc.yaml's outputs and the code's paths agree: nothing a stage writes is left out of
    DVC's cache (and so out of the run-cache), and every metrics file DVC names exists."""
    root = tiny_pipeline.root
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    outs = [out["path"] for stage in lock.values() for out in stage.get("outs", [])]
    written = [
        path.relative_to(root).as_posix()
        for folder in ("data", "models", "reports")
        for path in (root / folder).rglob("*")
        if path.is_file() and path.name != ".gitkeep"
    ]
    assert len(written) > 50
    undeclared = [f for f in written if not any(f == o or f.startswith(f"{o}/") for o in outs)]
    assert undeclared == []

    shown = json.loads(tiny_pipeline.dvc("metrics", "show", "--json"))[""]
    assert "error" not in shown
    files = {path: found.get("data") for path, found in shown["data"].items()}
    stages = ("evaluate", "finetune", "train_cnn", "train_head")
    assert sorted(files) == [f"reports/{stage}/metrics.json" for stage in stages]
    assert all(files.values()), files


def test_changing_a_head_param_reruns_only_what_depends_on_the_head(
    tiny_pipeline: PipelineCopy,
) -> None:
    client, experiment = tiny_pipeline.mlflow()
    before = {r.info.run_id for r in client.search_runs([experiment.experiment_id])}

    tiny_pipeline.set_param("head", "learning_rate", 0.001)
    output = tiny_pipeline.dvc("repro")

    assert stages_run(output) == ["train_head", "finetune", "evaluate"]
    new_runs = [
        r for r in client.search_runs([experiment.experiment_id]) if r.info.run_id not in before
    ]
    stages = sorted(r.data.tags["pipeline.stage"] for r in new_runs)
    # A new execution (new params) gets its own parent, holding exactly the stages that ran.
    assert stages == ["evaluate", "finetune", "pipeline", "train_head"]
    head_run = next(r for r in new_runs if r.data.tags["pipeline.stage"] == "train_head")
    assert head_run.data.params["head.learning_rate"] == "0.001"

    assert stages_run(tiny_pipeline.dvc("repro")) == []  # nothing changed: nothing runs
    assert len(client.search_runs([experiment.experiment_id])) == len(before) + len(new_runs)


def test_changing_the_augmentation_retrains_the_cnn_but_extracts_no_features_again(
    tiny_pipeline: PipelineCopy,
) -> None:
    root = tiny_pipeline.root
    kept = [root / "data/features/train.npz", root / "models/backbone.keras"]
    kept += [root / "models/head.keras", root / "data/augmented_features/disabled.json"]
    before = {path: path.read_bytes() for path in kept}

    tiny_pipeline.set_param("augment", "rotation", 0.05)
    ran = stages_run(tiny_pipeline.dvc("repro"))

    # finetune reads the augmented images too (finetune.use_augmented).
    expected = {"augment", "train_cnn", "extract_augmented_features", "finetune", "evaluate"}
    assert set(ran) == expected | {"explain"}
    assert {path: path.read_bytes() for path in kept} == before


def test_a_failed_stage_loses_nothing_that_dvc_checkout_of_the_stage_does_not_restore(
    tiny_pipeline: PipelineCopy,
) -> None:
    root = tiny_pipeline.root
    kept = [root / "data/features/train.npz", root / "models/backbone.keras"]
    kept += [root / "reports/extract_features/summary.json"]
    before = {path: path.read_bytes() for path in kept}

    tiny_pipeline.set_param("features", "weights", str(root / "missing.weights.h5"))
    output = tiny_pipeline.dvc("repro", check=False)
    tiny_pipeline.set_param("features", "weights", "none")

    assert "ERROR" in output and "missing.weights.h5, which does not exist" in output
    # DVC deletes a stage's outputs before running it (the run-cache needs them unpersisted)...
    assert not any(path.exists() for path in kept)
    # ...and the one command README's Guarantees give puts dvc.lock's back from the cache.
    tiny_pipeline.dvc("checkout", "extract_features")
    assert {path: path.read_bytes() for path in kept} == before
    assert "up to date" in tiny_pipeline.dvc("status")
    client, experiment = tiny_pipeline.mlflow()
    failed = client.search_runs(
        [experiment.experiment_id], filter_string="attributes.status = 'FAILED'"
    )
    by_stage = {r.data.tags["pipeline.stage"]: r for r in failed}
    assert sorted(by_stage) == ["extract_features", "pipeline"]
    assert "does not exist" in by_stage["extract_features"].data.tags["error"]
    assert by_stage["pipeline"].data.tags["pipeline.failed_stage"] == "extract_features"


def test_going_back_to_a_head_learning_rate_already_run_restores_it_from_the_run_cache(
    tiny_pipeline: PipelineCopy,
) -> None:
    root = tiny_pipeline.root
    client, experiment = tiny_pipeline.mlflow()
    trained = ["train_head", "finetune", "evaluate"]
    runs, seconds, outputs, heads, scores = [], [], [], [], []
    for rate in (0.0003, 0.003, 0.0003):  # A, B, A again: values no other test runs
        known = {r.info.run_id for r in client.search_runs([experiment.experiment_id])}
        start = time.monotonic()
        outputs.append(tiny_pipeline.dvc("exp", "run", "-S", f"head.learning_rate={rate}"))
        seconds.append(time.monotonic() - start)
        found = client.search_runs([experiment.experiment_id])
        runs.append([r for r in found if r.info.run_id not in known])
        heads.append((root / "models/head.keras").read_bytes())
        scores.append((root / "reports/evaluate/metrics.json").read_text())
    print(
        "run-cache, dvc exp run -S head.learning_rate=: "
        f"A {seconds[0]:.1f} s, B {seconds[1]:.1f} s, A again {seconds[2]:.1f} s"
    )

    assert stages_run(outputs[0]) == stages_run(outputs[1]) == trained
    assert sorted(r.data.tags["pipeline.stage"] for r in runs[1]) == sorted([*trained, "pipeline"])
    assert stages_run(outputs[2]) == [], outputs[2]
    for stage in trained:
        assert f"Stage '{stage}' is cached - skipping run, checking out outputs" in outputs[2]
    assert runs[2] == []  # no MLflow run: nothing trained, nothing evaluated
    assert heads[2] == heads[0] != heads[1]
    assert scores[2] == scores[0]
