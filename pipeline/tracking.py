"""MLflow at the edges: where runs go, how one pipeline execution is grouped, what each run carries.

Each DVC stage is its own process, so a pipeline execution is grouped by a parent run that
every stage finds (or creates) by a key: the DVC experiment name under `dvc exp run`, else
the git commit plus a hash of `params.yaml`. Each stage logs one child run under it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import subprocess
import urllib.parse
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import mlflow
import mlflow.data
import pandas as pd
import yaml
from mlflow.data.sources import LocalArtifactDatasetSource
from mlflow.entities import Param, Run
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.tracking.context.registry import resolve_tags

from pipeline import process
from pipeline.config import PARAMS_FILE, Config, ConfigError, flatten, parse_config
from pipeline.errors import TrackingError
from pipeline.files import project_root
from pipeline.images import CLASS_NAMES, LabeledImage

DEFAULT_EXPERIMENT = "dogs-vs-cats"
STORE_FILE = "mlflow.db"
ARTIFACTS_FOLDER = "mlartifacts"

KEY_TAG = "pipeline.key"
STAGE_TAG = "pipeline.stage"
PARAMS_HASH_TAG = "pipeline.params_hash"
COMMIT_TAG = "git.commit"
DVC_EXP_TAG = "dvc.exp_name"
FAILED_STAGE_TAG = "pipeline.failed_stage"
# The process that opened a run: a later execution fails the runs a killed process left open.
HOST_TAG = "pipeline.host"
PID_TAG = "pipeline.pid"
ENDED_TAG = "pipeline.ended"
CREDENTIALS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")


def default_store() -> tuple[str, str]:
    """The tracking URI and artifact location used when `MLFLOW_TRACKING_URI` is not set.

    A SQLite store and an artifact folder at the root of the user's repository, as absolute
    paths, so queued and `--temp` DVC experiments, which run in copies of the repository
    under `.dvc/tmp/exps`, log to the same store as the workspace.
    """
    root = project_root()
    return f"sqlite:///{root / STORE_FILE}", (root / ARTIFACTS_FOLDER).as_uri()


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or default_store()[0]


def sqlite_file(uri: str) -> Path | None:
    """The database file of a SQLite tracking URI; None for any other store."""
    from sqlalchemy.engine import make_url  # MLflow's own dependency for its SQL stores

    if not uri.startswith("sqlite:"):
        return None
    database = make_url(uri).database
    if not database or database == ":memory:":
        return None
    return Path(database).resolve()


def missing_sqlite_store(uri: str) -> Path | None:
    """The file of a SQLite store `uri` names that does not exist yet, else None.

    Opening such a store creates it: a reader (predict, compare, registry) checks first,
    rather than leave an empty `mlflow.db` wherever it was run.
    """
    path = sqlite_file(uri)
    return None if path is None or path.exists() else path


@contextlib.contextmanager
def store_lock(uri: str) -> Iterator[None]:
    """Holds an exclusive lock beside a SQLite store while the block opens it.

    MLflow creates or migrates a store on its first use, and processes doing that at once
    crash (`duplicate column name`): the first stages of a parallel `dvc queue`. A server
    migrates its own store once, so other URIs need no lock.
    """
    database = sqlite_file(uri)
    if database is None:
        yield
        return
    database.parent.mkdir(parents=True, exist_ok=True)
    with database.with_name(f"{database.name}.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or its process dies
        yield


def shown_uri(uri: str) -> str:
    """`uri` without any user or password in it, for messages."""
    parts = urllib.parse.urlsplit(uri)
    if not parts.hostname or "@" not in parts.netloc:
        return uri
    return parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()


def server_problem(error: MlflowException, uri: str) -> str | None:
    """One line on why the tracking server refused or could not be reached; None for an
    MLflow error of another kind (a bad param, a missing run), which keeps its traceback."""
    where = shown_uri(uri)
    if error.error_code in ("UNAUTHENTICATED", "PERMISSION_DENIED"):
        status = "401" if error.error_code == "UNAUTHENTICATED" else "403"
        return (
            f"the MLflow server at {where} refused the request ({status}): set "
            f"{' and '.join(CREDENTIALS)} to a user of that server that may write"
        )
    if error.message.startswith("API request to"):  # no connection, or a non-JSON 5xx
        # MLflow's message quotes the whole URL (credentials too, if in it) over many lines.
        reason = re.search(
            r"\[Errno \d+\] ([^\"')]+)|ResponseError\('([^']+)'|(timeout)", error.message
        )
        cause = next((g for g in reason.groups() if g), "") if reason else ""
        return f"cannot reach the MLflow server at {where}" + (f" ({cause})" if cause else "")
    return None


def experiment_name() -> str:
    return os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT


def _git(*args: str) -> str | None:
    try:
        result = subprocess.run(["git", *args], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return result.stdout


def git_commit() -> str | None:
    return (_git("rev-parse", "HEAD") or "").strip() or None


def baseline_params(revision: str) -> dict[str, Any] | None:
    """`params.yaml` as committed at `revision`, as `comparable_params` gives the current one;
    None where git cannot tell."""
    text = _git("show", f"{revision}:{PARAMS_FILE.as_posix()}")
    if text is None:
        return None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError:
        return None
    if not isinstance(raw, dict):
        return None
    try:
        # Validated like the current params, so defaults and types compare equal.
        return comparable_params(parse_config(raw))
    except ConfigError:  # a params.yaml this code no longer accepts: compare it as written
        return {k: v for k, v in flatten(raw).items() if not k.startswith("paths.")}


def params_diff(current: dict[str, Any], baseline: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """`{name: (baseline value, current value)}` for every param that differs."""
    names = sorted(set(current) | set(baseline))
    return {
        name: (baseline.get(name), current.get(name))
        for name in names
        if baseline.get(name) != current.get(name)
    }


def describe_execution(diff: dict[str, tuple[Any, Any]] | None, revision: str) -> str:
    """The Markdown description MLflow shows on the execution's parent run."""
    if diff is None:
        return "Pipeline execution (no git baseline to compare params with)."
    if not diff:
        return f"Pipeline execution with the params of `{revision[:7]}`."
    lines = [f"Params changed from `{revision[:7]}`:", ""]
    lines += [f"- `{name}`: {old} → {new}" for name, (old, new) in diff.items()]
    return "\n".join(lines)


def params_hash(cfg: Config) -> str:
    canonical = json.dumps(cfg.model_dump(mode="json"), sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]


def execution_identity(
    cfg: Config, commit: str | None, dvc_exp_name: str | None
) -> tuple[str, str]:
    """The grouping key and the readable name of this pipeline execution's parent run."""
    digest = params_hash(cfg)
    if dvc_exp_name:
        return f"exp:{dvc_exp_name}:{digest}", dvc_exp_name
    short = (commit or "nogit")[:7]
    return f"repro:{commit or 'nogit'}:{digest}", f"repro-{short}-{digest[:6]}"


def ensure_experiment(client: MlflowClient, name: str, artifact_location: str | None) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    return client.create_experiment(name, artifact_location=artifact_location)


def find_or_create_parent(
    client: MlflowClient,
    experiment_id: str,
    key: str,
    name: str,
    tags: Mapping[str, str],
    params: Mapping[str, Any],
) -> Run:
    found = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{KEY_TAG}` = '{key}' and tags.`{STAGE_TAG}` = 'pipeline'",
        max_results=1,
        order_by=["attributes.start_time DESC"],
    )
    if found:
        return found[0]
    # MLflow's context tags, as `mlflow.start_run` gives the stages' runs: the user among
    # them (the server's login, MLFLOW_TRACKING_USERNAME, where there is one).
    run = client.create_run(
        experiment_id,
        run_name=name,
        tags=resolve_tags({**tags, KEY_TAG: key, STAGE_TAG: "pipeline"}),
    )
    # Every param on the parent too, so executions compare in MLflow's table and chart views.
    client.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in params.items()])
    return run


def child_run_name(stage: str, execution: str) -> str:
    """What chart legends show: the stage and its execution, so that two executions' curves
    of one stage are told apart in one chart."""
    return f"{stage} · {execution}"


def close_parent(client: MlflowClient, parent: Run, stage: str, failed: bool) -> None:
    """The parent's status and end as its last stage left them: FAILED, naming the stage in
    `pipeline.failed_stage`, until that stage succeeds in the same execution; its end is this
    stage's, so its duration runs from the first stage's start to the last one's end."""
    run_id = parent.info.run_id
    failed_stage = client.get_run(run_id).data.tags.get(FAILED_STAGE_TAG)
    if failed:
        client.set_tag(run_id, FAILED_STAGE_TAG, stage)
        failed_stage = stage
    elif failed_stage == stage:
        client.delete_tag(run_id, FAILED_STAGE_TAG)
        failed_stage = None
    client.set_terminated(run_id, "FAILED" if failed_stage else "FINISHED")


def fail_abandoned_runs(
    client: MlflowClient, experiment_id: str, parent_id: str | None = None, stage: str = ""
) -> list[str]:
    """Marks FAILED the runs still RUNNING that nothing will close, saying why in
    `pipeline.ended`; their ids. Such a run is either

    - one whose process, on this host, has ended: a stage killed outright (SIGKILL, out of
      memory) never closes its run, which MLflow would show as running for ever;
    - `stage`'s run under `parent_id`, which starts again now: the run of a stage that lost
      its tracking server before it could close it, from any host.

    Other runs are left as they are: those of processes still running (a parallel queue),
    of other hosts (a shared server) or from before these tags.
    """
    host = process.this_host()
    abandoned = []
    for run in client.search_runs([experiment_id], filter_string="attributes.status = 'RUNNING'"):
        tags = run.data.tags
        pid = tags.get(PID_TAG, "")
        run_host = tags.get(HOST_TAG)
        if (
            parent_id
            and tags.get("mlflow.parentRunId") == parent_id
            and tags.get(STAGE_TAG) == stage
        ):
            ended = f"rerun: {stage} of this execution started again before this run was closed"
        elif run_host == host and pid.isdigit() and process.has_ended(host, int(pid)):
            ended = f"killed: process {pid} on {host} ended without closing this run"
        else:
            continue
        client.set_tag(run.info.run_id, ENDED_TAG, ended)
        client.set_terminated(run.info.run_id, "FAILED")
        abandoned.append(run.info.run_id)
        if run_parent := tags.get("mlflow.parentRunId"):
            # Failed until that stage succeeds, as `close_parent` keeps it.
            client.set_tag(run_parent, FAILED_STAGE_TAG, tags.get(STAGE_TAG, ""))
    return abandoned


@contextlib.contextmanager
def stage_run(
    stage: str,
    cfg: Config,
    params: Mapping[str, Any] | None = None,
    system_metrics: bool = False,
) -> Iterator[Run]:
    """Opens this stage's child run under the execution's parent run and logs `params`.

    `params` are flattened (`head.learning_rate`), the names `dvc exp show` uses too
    (`stage.declared_params` gives a stage's own). A tracking server that refuses or goes
    away raises a `TrackingError` naming it (`server_problem`); the outputs the stage was
    staging are dropped (`pipeline.files`: what comes back, and how).
    """
    uri = tracking_uri()
    try:
        with _stage_run(stage, cfg, params or {}, system_metrics) as run:
            yield run
    except MlflowException as error:
        if (problem := server_problem(error, uri)) is None:
            raise
        raise TrackingError(problem) from None


@contextlib.contextmanager
def _stage_run(
    stage: str, cfg: Config, params: Mapping[str, Any], system_metrics: bool
) -> Iterator[Run]:
    # A server chooses its own artifact store; the default store keeps artifacts beside it
    # rather than relative to whichever copy of the repository created the experiment.
    # (Read before set_tracking_uri, which exports MLFLOW_TRACKING_URI to the environment.)
    artifact_location = None if "MLFLOW_TRACKING_URI" in os.environ else default_store()[1]
    mlflow.set_tracking_uri(tracking_uri())
    with store_lock(tracking_uri()):
        client = MlflowClient()
        experiment_id = ensure_experiment(client, experiment_name(), artifact_location)
    commit = git_commit()
    dvc_exp_name = os.environ.get("DVC_EXP_NAME")
    key, name = execution_identity(cfg, commit, dvc_exp_name)
    tags = {
        PARAMS_HASH_TAG: params_hash(cfg),
        HOST_TAG: process.this_host(),
        PID_TAG: str(os.getpid()),
    }
    if commit:
        tags[COMMIT_TAG] = commit
        tags["mlflow.source.git.commit"] = commit
    if dvc_exp_name:
        tags[DVC_EXP_TAG] = dvc_exp_name
    all_params = comparable_params(cfg)
    baseline = os.environ.get("DVC_EXP_BASELINE_REV") or commit or "HEAD"
    before = baseline_params(baseline)
    diff = None if before is None else params_diff(all_params, before)
    tags["mlflow.note.content"] = describe_execution(diff, baseline)
    parent = find_or_create_parent(client, experiment_id, key, name, tags, all_params)
    fail_abandoned_runs(client, experiment_id, parent.info.run_id, stage)
    # Running while one of its stages runs, owned by that stage's process (so a parallel
    # execution does not take it for a killed one's); the end time of a stage before is kept.
    for tag in (HOST_TAG, PID_TAG):
        client.set_tag(parent.info.run_id, tag, tags[tag])
    client.update_run(parent.info.run_id, status="RUNNING")
    failed = True
    try:
        with mlflow.start_run(
            experiment_id=experiment_id,
            run_name=child_run_name(stage, name),
            parent_run_id=parent.info.run_id,
            tags={**tags, STAGE_TAG: stage, KEY_TAG: key},
            log_system_metrics=system_metrics,
        ) as run:
            mlflow.log_params(dict(params))
            yield run
        failed = False
    finally:
        close_parent(client, parent, stage, failed)


def comparable_params(cfg: Config) -> dict[str, Any]:
    """Every param that can change a result, flattened; paths only say where files go."""
    return {k: v for k, v in flatten(cfg).items() if not k.startswith("paths.")}


def log_image_inputs(
    images: Sequence[LabeledImage], name: str, context: str
) -> mlflow.data.pandas_dataset.PandasDataset:
    """Logs the image files a stage read as an MLflow dataset input (files and labels), and
    returns the dataset, for metrics computed on it (`mlflow.log_metrics(dataset=...)`)."""
    frame = pd.DataFrame(
        {
            "file": [i.path.as_posix() for i in images],
            "label": [CLASS_NAMES[i.label] for i in images],
        }
    )
    folder = os.path.commonpath([i.path.parent.as_posix() for i in images]) if images else "."
    source = LocalArtifactDatasetSource(Path(folder).resolve().as_uri())
    dataset = mlflow.data.from_pandas(frame, source=source, targets="label", name=name)
    mlflow.log_input(dataset, context=context)
    return dataset


def parent_run_id(run: Run) -> str:
    return run.data.tags["mlflow.parentRunId"]


def log_to_parent(run: Run, metrics: Mapping[str, float]) -> None:
    """Puts metrics on the execution's parent run, so executions compare in MLflow's chart view."""
    client, parent = MlflowClient(), parent_run_id(run)
    for name, value in metrics.items():
        client.log_metric(parent, name, float(value))
