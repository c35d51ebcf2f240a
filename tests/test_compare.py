from __future__ import annotations

import csv
import io

import mlflow
import pytest
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from pipeline import compare, tracking
from pipeline.errors import PipelineError


@pytest.fixture
def store(tmp_path, monkeypatch) -> MlflowClient:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    experiment = client.create_experiment(tracking.DEFAULT_EXPERIMENT)
    executions = [
        ("baseline", {"head.learning_rate": "0.0001", "head.units": "256"}, 0.80, 0.41),
        ("fast-lr", {"head.learning_rate": "0.001", "head.units": "256"}, 0.86, 0.35),
        ("small-head", {"head.learning_rate": "0.0001", "head.units": "64"}, 0.78, 0.47),
    ]
    for name, params, accuracy, loss in executions:
        run = client.create_run(
            experiment,
            run_name=name,
            tags={tracking.STAGE_TAG: "pipeline", tracking.DVC_EXP_TAG: name},
        )
        client.log_batch(
            run.info.run_id,
            params=[Param(k, v) for k, v in {**params, "common.seed": "42"}.items()],
            metrics=[
                Metric("transfer/test/accuracy", accuracy, 0, 0),
                Metric("transfer/test/log_loss", loss, 0, 0),
            ],
        )
        # A stage run must not show up as an execution of its own.
        client.create_run(
            experiment, run_name="train_head", tags={tracking.STAGE_TAG: "train_head"}
        )
    return client


def test_one_row_per_execution_with_only_the_params_that_differ(store) -> None:
    table = compare.comparison(
        compare.executions(tracking.DEFAULT_EXPERIMENT), "transfer/test/accuracy"
    )
    assert list(table["run"]) == ["fast-lr", "baseline", "small-head"]
    assert "head.learning_rate" in table and "head.units" in table
    assert "common.seed" not in table
    assert list(table["transfer/test/accuracy"]) == [0.86, 0.80, 0.78]


def test_losses_sort_lowest_first(store) -> None:
    table = compare.comparison(
        compare.executions(tracking.DEFAULT_EXPERIMENT), "transfer/test/log_loss"
    )
    assert list(table["run"]) == ["fast-lr", "baseline", "small-head"]


def test_csv_and_markdown_outputs(store, capsys) -> None:
    compare.main(["--csv"])
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [r["dvc_exp"] for r in rows] == ["fast-lr", "baseline", "small-head"]
    compare.main(["--markdown", "--metric", "transfer/test/log_loss"])
    lines = capsys.readouterr().out.splitlines()
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]
    assert rows[0][:2] == ["run", "dvc_exp"] and set("".join(rows[1])) == {":", "-"}
    assert rows[2][:2] == ["fast-lr", "fast-lr"] and "0.3500" in rows[2]


def test_markdown_keeps_params_as_logged_and_leaves_missing_metrics_blank() -> None:
    import pandas as pd

    table = pd.DataFrame(
        {
            "commit": ["1234567"],
            "head.learning_rate": ["1e-05"],
            "cnn/test/accuracy": [float("nan")],
        }
    )
    row = compare.to_markdown(table).splitlines()[2]
    assert [cell.strip() for cell in row.strip("|").split("|")] == ["1234567", "1e-05", ""]


def test_an_empty_store_says_so(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'empty.db'}")
    with pytest.raises(PipelineError, match="no pipeline executions"):
        compare.main([])


def test_an_unknown_metric_lists_the_known_ones_and_limit_counts_rows(store, capsys) -> None:
    with pytest.raises(PipelineError, match=r"no execution has the metric 'transfer/test/acuracy'"):
        compare.main(["--metric", "transfer/test/acuracy"])
    compare.main(["--csv", "--limit", "1"])
    assert [r["dvc_exp"] for r in csv.DictReader(io.StringIO(capsys.readouterr().out))] == [
        "fast-lr"
    ]
    with pytest.raises(SystemExit) as exit_info:
        compare.main(["--limit", "0"])
    assert exit_info.value.code == 2  # argparse's usage error


def test_an_unreachable_server_is_one_line(monkeypatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with pytest.raises(
        PipelineError, match=r"cannot reach the MLflow server at http://127\.0\.0\.1:9"
    ):
        compare.main([])
