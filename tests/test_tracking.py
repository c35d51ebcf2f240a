from __future__ import annotations

from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from pipeline import tracking
from tests.conftest import REPO_ROOT


@pytest.fixture
def workspace(tmp_path: Path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "DVC_EXP_NAME", "DVC_ROOT"):
        # set, then delete: teardown then also removes what mlflow.set_tracking_uri exports
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    yield tmp_path
    mlflow.end_run()


def test_default_store_is_absolute_and_shared_with_dvc_temp_copies(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    inside = tmp_path / ".dvc" / "tmp" / "exps" / "tmpxyz"
    inside.mkdir(parents=True)
    monkeypatch.chdir(inside)
    assert tracking.tracking_uri() == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking.tracking_uri() == "http://127.0.0.1:5000"


def test_execution_identity(repo_config) -> None:
    key, name = tracking.execution_identity(repo_config, "abcdef123456", None)
    assert key.startswith("repro:abcdef123456:") and name.startswith("repro-abcdef1-")
    key2, name2 = tracking.execution_identity(repo_config, "abcdef123456", "quick-fox")
    assert name2 == "quick-fox" and key2 != key
    changed = repo_config.model_copy(
        update={"head": repo_config.head.model_copy(update={"learning_rate": 0.5})}
    )
    assert tracking.execution_identity(changed, "abcdef123456", None)[0] != key


def test_stages_of_one_execution_share_one_parent(workspace, repo_config, monkeypatch):
    monkeypatch.setenv("DVC_EXP_NAME", "brisk-lynx")
    with tracking.stage_run("split", repo_config, "common", "split") as first:
        mlflow.log_metric("data/images_total", 10)
    with tracking.stage_run("evaluate", repo_config, "evaluate") as second:
        tracking.log_to_parent(second, {"cnn/test/accuracy": 0.8})

    parent_id = tracking.parent_run_id(first)
    assert tracking.parent_run_id(second) == parent_id
    client = MlflowClient(tracking.tracking_uri())
    parent = client.get_run(parent_id)
    assert parent.info.run_name == "brisk-lynx"
    assert parent.data.tags["dvc.exp_name"] == "brisk-lynx"
    assert parent.data.metrics == {"cnn/test/accuracy": 0.8}
    split = client.get_run(first.info.run_id)
    fraction = repo_config.split.validation_fraction
    assert split.data.params["split.validation_fraction"] == str(fraction)
    assert split.data.params["common.seed"] == "42"
    assert not any(name.startswith("head.") for name in split.data.params)
    experiment = client.get_experiment(parent.info.experiment_id)
    assert experiment.name == "dogs-vs-cats"
    assert experiment.artifact_location == (workspace / "mlartifacts").resolve().as_uri()


def committed_params(workspace: Path) -> str:
    """This repository's params.yaml committed in a fresh git repo at `workspace`; its sha."""
    import shutil
    import subprocess

    shutil.copy(REPO_ROOT / "params.yaml", workspace / "params.yaml")
    identity = ["-c", "user.name=test", "-c", "user.email=test@example.com"]
    for command in (["init", "-q"], ["add", "params.yaml"], [*identity, "commit", "-qm", "p"]):
        subprocess.run(["git", *command], cwd=workspace, check=True)
    sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=workspace, capture_output=True)
    return sha.stdout.decode().strip()


def test_the_parent_run_says_which_params_differ_from_the_commit(workspace, repo_config):
    sha = committed_params(workspace)
    client = MlflowClient(tracking.tracking_uri())
    with tracking.stage_run("split", repo_config, "split") as unchanged:
        pass
    note = client.get_run(tracking.parent_run_id(unchanged)).data.tags["mlflow.note.content"]
    assert note == f"Pipeline execution with the params of `{sha[:7]}`."

    edited = repo_config.model_copy(
        update={"head": repo_config.head.model_copy(update={"units": 128})}
    )
    with tracking.stage_run("train_head", edited, "head") as run:
        pass
    note = client.get_run(tracking.parent_run_id(run)).data.tags["mlflow.note.content"]
    assert note == f"Params changed from `{sha[:7]}`:\n\n- `head.units`: 256 → 128"


def test_a_failing_stage_marks_its_run_and_its_parent_failed_until_it_succeeds(
    workspace, repo_config
):
    with tracking.stage_run("download", repo_config, "download") as done:
        pass
    with pytest.raises(SystemExit), tracking.stage_run("split", repo_config, "split") as run:
        raise SystemExit("split: boom")
    client = MlflowClient(tracking.tracking_uri())
    assert client.get_run(run.info.run_id).info.status == "FAILED"
    parent_id = tracking.parent_run_id(run)
    assert tracking.parent_run_id(done) == parent_id
    parent = client.get_run(parent_id)
    assert parent.info.status == "FAILED"
    assert parent.data.tags[tracking.FAILED_STAGE_TAG] == "split"

    with tracking.stage_run("split", repo_config, "split") as retried:  # `dvc repro` again
        pass
    assert tracking.parent_run_id(retried) == parent_id
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED"
    assert tracking.FAILED_STAGE_TAG not in parent.data.tags


def test_the_parent_lasts_from_the_first_stage_start_to_the_last_stage_end(workspace, repo_config):
    with tracking.stage_run("split", repo_config, "split") as first:
        pass
    with tracking.stage_run("augment", repo_config, "augment") as last:
        mlflow.log_metric("data/variants_written", 1)
    client = MlflowClient(tracking.tracking_uri())
    parent = client.get_run(tracking.parent_run_id(last)).info
    first, last = (client.get_run(r.info.run_id).info for r in (first, last))
    assert parent.status == "FINISHED"
    assert parent.start_time <= first.start_time
    assert parent.end_time >= last.end_time
    assert parent.end_time - parent.start_time >= last.end_time - first.start_time


def test_child_runs_are_named_after_their_stage_and_execution(workspace, repo_config, monkeypatch):
    names = []
    for execution in ("brisk-lynx", "calm-otter"):
        monkeypatch.setenv("DVC_EXP_NAME", execution)
        with tracking.stage_run("train_cnn", repo_config, "train_cnn") as run:
            pass
        names.append(MlflowClient(tracking.tracking_uri()).get_run(run.info.run_id).info.run_name)
    assert names == ["train_cnn · brisk-lynx", "train_cnn · calm-otter"]
