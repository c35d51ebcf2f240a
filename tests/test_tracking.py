from __future__ import annotations

from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from pipeline import stage, tracking
from pipeline.errors import MissingInputError, TrackingError
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
    params = stage.declared_params("split", repo_config, REPO_ROOT / "dvc.yaml")
    with tracking.stage_run("split", repo_config, params) as first:
        mlflow.log_metric("data/images_total", 10)
    with tracking.stage_run("evaluate", repo_config) as second:
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
    with tracking.stage_run("split", repo_config) as unchanged:
        pass
    note = client.get_run(tracking.parent_run_id(unchanged)).data.tags["mlflow.note.content"]
    assert note == f"Pipeline execution with the params of `{sha[:7]}`."

    edited = repo_config.model_copy(
        update={"head": repo_config.head.model_copy(update={"units": 128})}
    )
    with tracking.stage_run("train_head", edited) as run:
        pass
    note = client.get_run(tracking.parent_run_id(run)).data.tags["mlflow.note.content"]
    assert note == f"Params changed from `{sha[:7]}`:\n\n- `head.units`: 256 → 128"


def test_a_failing_stage_marks_its_run_and_its_parent_failed_until_it_succeeds(
    workspace, repo_config
):
    with tracking.stage_run("download", repo_config) as done:
        pass
    with pytest.raises(MissingInputError), tracking.stage_run("split", repo_config) as run:
        raise MissingInputError("boom")
    client = MlflowClient(tracking.tracking_uri())
    assert client.get_run(run.info.run_id).info.status == "FAILED"
    parent_id = tracking.parent_run_id(run)
    assert tracking.parent_run_id(done) == parent_id
    parent = client.get_run(parent_id)
    assert parent.info.status == "FAILED"
    assert parent.data.tags[tracking.FAILED_STAGE_TAG] == "split"

    with tracking.stage_run("split", repo_config) as retried:  # `dvc repro` again
        pass
    assert tracking.parent_run_id(retried) == parent_id
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED"
    assert tracking.FAILED_STAGE_TAG not in parent.data.tags


def test_the_parent_lasts_from_the_first_stage_start_to_the_last_stage_end(workspace, repo_config):
    with tracking.stage_run("split", repo_config) as first:
        pass
    with tracking.stage_run("augment", repo_config) as last:
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
        with tracking.stage_run("train_cnn", repo_config) as run:
            pass
        names.append(MlflowClient(tracking.tracking_uri()).get_run(run.info.run_id).info.run_name)
    assert names == ["train_cnn · brisk-lynx", "train_cnn · calm-otter"]


def test_an_execution_and_its_stages_carry_the_servers_login_as_their_user(
    workspace, repo_config, monkeypatch
):
    """On a shared server each person logs in as themselves (MLFLOW_TRACKING_USERNAME): their
    executions say so, not the account the runner's process happens to run as."""
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
    with tracking.stage_run("split", repo_config) as run:
        pass
    client = MlflowClient(tracking.tracking_uri())
    parent = client.get_run(tracking.parent_run_id(run))
    assert client.get_run(run.info.run_id).data.tags["mlflow.user"] == "alice"
    assert parent.data.tags["mlflow.user"] == "alice" and parent.info.user_id == "alice"


def test_a_failing_stage_marks_its_run_failed(workspace, repo_config):
    with pytest.raises(MissingInputError), tracking.stage_run("download", repo_config) as run:
        raise MissingInputError("boom")
    status = MlflowClient(tracking.tracking_uri()).get_run(run.info.run_id).info.status
    assert status == "FAILED"


def test_runs_a_killed_process_left_running_are_failed_by_the_next_execution(
    workspace, repo_config
):
    import os
    import subprocess
    import sys

    from pipeline import process

    script = (
        "import os, signal, sys\n"
        "from pathlib import Path\n"
        "from pipeline import tracking\n"
        "from pipeline.config import load_config\n"
        "cfg = load_config(Path(sys.argv[1]))\n"
        "with tracking.stage_run('train_cnn', cfg) as run:\n"
        "    print(run.info.run_id, flush=True)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"  # as the OOM killer would
    )
    killed = subprocess.run(
        [sys.executable, "-c", script, str(REPO_ROOT / "params.yaml")],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        cwd=workspace,
    )
    assert killed.returncode == -9, killed.stderr
    dead_id = killed.stdout.strip()
    client = MlflowClient(tracking.tracking_uri())
    assert client.get_run(dead_id).info.status == "RUNNING"
    parent_id = client.get_run(dead_id).data.tags["mlflow.parentRunId"]
    # As if killed between creating the parent and closing it (it carries the same owner).
    client.update_run(parent_id, status="RUNNING")
    # A stage another process is running now (a parallel queue) keeps its run open.
    live = client.create_run(
        client.get_run(dead_id).info.experiment_id,
        tags={tracking.HOST_TAG: process.this_host(), tracking.PID_TAG: str(os.getppid())},
    )
    # Another host's run (a shared server), even with the pid that ended here, stays open.
    elsewhere = client.create_run(
        client.get_run(dead_id).info.experiment_id,
        tags={
            tracking.HOST_TAG: "another-host",
            tracking.PID_TAG: client.get_run(dead_id).data.tags[tracking.PID_TAG],
        },
    )

    with tracking.stage_run("split", repo_config) as run:
        pass

    dead = client.get_run(dead_id)
    assert dead.info.status == "FAILED"
    assert dead.data.tags[tracking.ENDED_TAG].startswith("killed: process ")
    assert client.get_run(parent_id).info.status == "FAILED"
    assert client.get_run(live.info.run_id).info.status == "RUNNING"
    assert client.get_run(elsewhere.info.run_id).info.status == "RUNNING"
    assert client.get_run(run.info.run_id).info.status == "FINISHED"


def test_four_stages_starting_at_once_on_a_fresh_store_all_log(workspace):
    """A fresh SQLite store is created by MLflow's migrations, which crash when several
    processes run them at once (`duplicate column name`): a parallel queue's first stages."""
    import os
    import subprocess
    import sys
    import time

    go = workspace / "go"
    script = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "import mlflow\n"
        "from pipeline import tracking\n"
        "from pipeline.config import load_config\n"
        "cfg = load_config(Path(sys.argv[1]))\n"
        "while not Path(sys.argv[2]).exists():\n"  # everything imported: start together
        "    time.sleep(0.01)\n"
        "with tracking.stage_run('split', cfg):\n"
        "    mlflow.log_metric('images_total', 1)\n"
    )
    children = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(REPO_ROOT / "params.yaml"), str(go)],
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "DVC_EXP_NAME": f"exp-{n}"},
            cwd=workspace,
        )
        for n in range(4)
    ]
    time.sleep(1)
    go.touch()
    errors = [child.communicate(timeout=300)[1] for child in children]
    assert [child.returncode for child in children] == [0] * 4, "\n".join(errors)
    client = MlflowClient(tracking.tracking_uri())
    runs = client.search_runs(
        [client.get_experiment_by_name("dogs-vs-cats").experiment_id],
        filter_string="tags.`pipeline.stage` = 'split'",
    )
    assert sorted(r.data.tags["dvc.exp_name"] for r in runs) == [f"exp-{n}" for n in range(4)]
    assert all(r.data.metrics == {"images_total": 1} for r in runs)


def test_a_parent_running_a_later_stage_is_owned_by_that_stages_process(workspace, repo_config):
    """The parent carries the pid of the stage running under it, not of the first stage (long
    ended), so a parallel execution's stage does not take it for a killed one's."""
    import os
    import subprocess
    import sys

    with tracking.stage_run("download", repo_config) as first:
        pass
    client = MlflowClient(tracking.tracking_uri())
    parent_id = tracking.parent_run_id(first)
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], text=True,
                           capture_output=True, check=True).stdout.strip()  # fmt: skip
    client.set_tag(parent_id, tracking.PID_TAG, ended)  # as the first stage's process left it
    with tracking.stage_run("split", repo_config):
        parent = client.get_run(parent_id)
        assert parent.info.status == "RUNNING"
        assert parent.data.tags[tracking.PID_TAG] == str(os.getpid())
        assert tracking.fail_abandoned_runs(client, parent.info.experiment_id) == []
    assert client.get_run(parent_id).info.status == "FINISHED"


def test_a_run_left_running_is_marked_failed_when_its_stage_runs_again(workspace, repo_config):
    with tracking.stage_run("train_head", repo_config) as lost:
        pass
    client = MlflowClient(tracking.tracking_uri())
    # What a stage that lost its server mid-run leaves: a child run never closed.
    # Its process (this one) is alive: only running the same stage again tells it is lost.
    client.update_run(lost.info.run_id, status="RUNNING")
    with tracking.stage_run("evaluate", repo_config):
        pass
    assert client.get_run(lost.info.run_id).info.status == "RUNNING"
    with tracking.stage_run("train_head", repo_config) as rerun:
        pass
    stale = client.get_run(lost.info.run_id)
    assert stale.info.status == "FAILED"
    assert stale.data.tags[tracking.ENDED_TAG] == (
        "rerun: train_head of this execution started again before this run was closed"
    )
    assert client.get_run(rerun.info.run_id).info.status == "FINISHED"
    assert client.get_run(tracking.parent_run_id(rerun)).info.status == "FINISHED"


def test_an_unreachable_server_ends_the_stage_with_one_line_naming_it(
    workspace, repo_config, monkeypatch
):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://runner:s3cret@127.0.0.1:9")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with pytest.raises(TrackingError) as error, tracking.stage_run("split", repo_config):
        pass
    message = str(error.value)
    assert message.startswith("cannot reach the MLflow server at http://127.0.0.1:9")
    assert "\n" not in message and "s3cret" not in message


def test_a_refused_request_names_the_variables_to_set() -> None:
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import PERMISSION_DENIED, UNAUTHENTICATED

    refused = MlflowException("API request to endpoint ... 401", error_code=UNAUTHENTICATED)
    line = tracking.server_problem(refused, "http://127.0.0.1:5000")
    assert line == (
        "the MLflow server at http://127.0.0.1:5000 refused the request (401): set "
        "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD to a user of that server that "
        "may write"
    )
    forbidden = MlflowException("no", error_code=PERMISSION_DENIED)
    assert "(403)" in tracking.server_problem(forbidden, "http://127.0.0.1:5000")
    assert tracking.server_problem(MlflowException("bad param value"), "http://x") is None
