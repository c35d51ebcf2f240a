"""The tiny pipeline against a real MLflow tracking server, then the registry and predict."""

from __future__ import annotations

import csv

import pytest
from mlflow.tracking import MlflowClient

from devtools.fakes import write_kaggle_tree
from devtools.pipeline_copy import PipelineCopy
from pipeline.tracking import DEFAULT_EXPERIMENT
from tests.conftest import zip_tree
from tests.mlflow_server import mlflow_server

pytestmark = pytest.mark.slow


def test_pipeline_logs_to_a_shared_server_and_the_champion_predicts(tmp_path) -> None:
    write_kaggle_tree(tmp_path / "src", per_class=16)
    archive = zip_tree(tmp_path / "src", tmp_path / "train.zip")
    (tmp_path / "server").mkdir()
    with mlflow_server(tmp_path / "server") as url:
        copy = PipelineCopy.create(tmp_path / "repo", archive)
        copy.env["MLFLOW_TRACKING_URI"] = url
        copy.dvc("exp", "run", "-n", "on-server")

        assert not (copy.root / "mlflow.db").exists()  # nothing went to the default store
        client = MlflowClient(url)
        experiment = client.get_experiment_by_name(DEFAULT_EXPERIMENT)
        parent = client.search_runs(
            [experiment.experiment_id], filter_string="tags.`pipeline.stage` = 'pipeline'"
        )
        assert [run.info.run_name for run in parent] == ["on-server"]
        children = client.search_runs(
            [experiment.experiment_id],
            filter_string=f"tags.mlflow.parentRunId = '{parent[0].info.run_id}'",
        )
        assert len(children) == 9
        evaluate = next(r for r in children if r.data.tags["pipeline.stage"] == "evaluate")
        artifacts = {a.path for a in client.list_artifacts(evaluate.info.run_id, "reports")}
        assert "reports/mistakes_cnn.png" in artifacts and "reports/calibration.png" in artifacts
        assert evaluate.inputs.dataset_inputs[0].dataset.name == "test"

        models = client.search_logged_models([experiment.experiment_id])
        assert sorted(m.name for m in models) == ["cnn", "finetuned", "transfer"]
        for model in models:
            assert {m.key for m in model.metrics} >= {"test/accuracy", "test/log_loss"}

        promoted = copy.run(copy.python, "-m", "pipeline.registry", "promote")
        assert "alias @champion" in promoted
        version = client.get_model_version_by_alias("dogs-vs-cats", "champion")
        assert version.version == "1"
        best = max(models, key=lambda m: {x.key: x.value for x in m.metrics}["test/accuracy"])
        assert version.source == f"models:/{best.model_id}"
        # Promoting the same best model again reuses its version.
        copy.run(copy.python, "-m", "pipeline.registry", "promote", "--alias", "prod")
        versions = client.search_model_versions("name = 'dogs-vs-cats'")
        assert [v.version for v in versions] == ["1"]
        assert client.get_model_version_by_alias("dogs-vs-cats", "prod").version == "1"
        refused = copy.run(
            copy.python, "-m", "pipeline.registry", "promote", "--alias", "v2", check=False
        )
        assert "reserved by MLflow" in refused

        out = tmp_path / "predictions.csv"
        copy.run(
            copy.python,
            "-m",
            "pipeline.predict",
            "--model",
            "models:/dogs-vs-cats@champion",
            str(tmp_path / "src" / "train"),
            "--out",
            str(out),
        )
        rows = list(csv.DictReader(out.open()))
        assert len(rows) == 32 and {r["label"] for r in rows} <= {"cat", "dog"}
