"""The team setup for real: `pipeline.team_stack` (PostgreSQL, `rclone serve s3`, MLflow with
basic auth and S3 artifacts) on 127.0.0.1, a maintainer's baseline pushed to it, then a
runner that plays the GPU workflow's own `run:` steps, a teammate who fetches the result,
who gets in, parallel load, and a server that goes away mid-run."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from base64 import b64encode
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from mlflow.exceptions import MlflowException
from mlflow.server import get_app_client
from mlflow.tracking import MlflowClient

from devtools.fakes import write_kaggle_tree
from devtools.pipeline_copy import REPO_ROOT, TINY_PARAMS, PipelineCopy, clean_env
from pipeline.team_stack import Ports, TeamStack, logged_in, team_stack
from pipeline.tracking import DEFAULT_EXPERIMENT, ENDED_TAG, server_problem
from tests.conftest import zip_tree

pytestmark = pytest.mark.slow

WORKFLOW = REPO_ROOT / ".github" / "workflows" / "gpu-experiment.yml"
RUNNER_EXP = "gpu-1-1"
RUNNER_OVERRIDES = "head.units=12"
# A guard per command, generous: CI's 2 cores may be shared with benchmarks.
TIMEOUT_S = 1800

# Where a step needs Docker or GitHub, these stand in for them (docs/remote-runners.md):
# `docker run IMAGE CMD...` runs CMD with the runner's venv instead of the image, `docker
# build` and `docker image rm` do nothing, `nvidia-smi` says there is no GPU, and the
# GitHub push URL the push step builds is the team's local bare repository.
DOCKER_STAND_IN = r"""#!/usr/bin/env bash
case "$1" in
  build) echo "docker build: skipped (the runner's .venv stands in for the image)"; exit 0 ;;
  image) echo "docker $*: skipped"; exit 0 ;;
  run) shift ;;
  *) echo "docker stand-in: no '$1'" >&2; exit 2 ;;
esac
while [ $# -gt 0 ]; do
  case "$1" in
    --rm | --*=*) shift ;;
    --gpus | --shm-size | --volume | --env | -v | -e) shift 2 ;;
    -*) echo "docker stand-in: no option $1" >&2; exit 2 ;;
    *) shift; break ;;  # the image
  esac
done
args=()
for arg in "$@"; do
  case "$arg" in https://x-access-token:*) args+=("$LOCAL_GIT_REMOTE") ;; *) args+=("$arg") ;; esac
done
exec "${args[@]}"
"""
NVIDIA_SMI_STAND_IN = '#!/bin/sh\necho "nvidia-smi: no GPU here (stand-in); training on the CPU"\n'


@pytest.fixture(scope="session")
def stack() -> Iterator[TeamStack]:
    # Not under pytest's tmp_path: PostgreSQL runs as the user postgres (when tests run as
    # root), who cannot enter pytest's private /tmp/pytest-of-root.
    folder = Path(tempfile.mkdtemp(prefix="team-stack-"))
    folder.chmod(0o755)
    try:
        with team_stack(folder / "stack", ports=Ports.free()) as running:
            yield running
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@dataclass
class Team:
    stack: TeamStack
    origin: Path  # the team's git repository (a bare one standing in for GitHub)
    maintainer: PipelineCopy
    work: Path

    def env(self) -> dict[str, str]:
        """What each member exports: the stack's client.env, and MLflow giving up quickly
        on a server that went away instead of retrying for minutes."""
        return {
            **self.stack.client_env(),
            "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
            "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
        }

    def clone(
        self,
        name: str,
        connect: bool = True,
        pull: bool = True,
        login: dict[str, str] | None = None,
    ) -> PipelineCopy:
        """A teammate's clone of the team repository, its DVC remote set as the docs say;
        `login` replaces the admin's MLflow login."""
        root = self.work / name
        subprocess.run(["git", "clone", "-q", str(self.origin), str(root)], check=True)
        env = {**clean_env(root), **self.env(), **(login or {})}
        member = PipelineCopy(root=root, env=env, timeout_s=TIMEOUT_S)
        if connect:
            connect_remote(member)
        if pull:
            member.dvc("pull")
        return member


def connect_remote(copy: PipelineCopy) -> None:
    env = copy.env
    copy.dvc("remote", "add", "--local", "--default", "--force", "storage", env["DVC_REMOTE_URL"])
    copy.dvc("remote", "modify", "--local", "storage", "endpointurl", env["DVC_REMOTE_ENDPOINT"])


@pytest.fixture(scope="session")
def team(stack: TeamStack, tmp_path_factory: pytest.TempPathFactory) -> Team:
    """The maintainer's baseline: the tiny pipeline run once against the shared server, its
    outputs pushed to the S3 remote, its commit pushed to the team repository."""
    work = tmp_path_factory.mktemp("team")
    write_kaggle_tree(work / "images", per_class=16)
    archive = zip_tree(work / "images", work / "dogs-vs-cats.zip")
    origin = work / "origin.git"
    subprocess.run(["git", "init", "-q", "--bare", "-b", "main", str(origin)], check=True)
    # Fine-tuning off: the slowest stage adds nothing to what these tests check.
    maintainer = PipelineCopy.create(work / "maintainer", archive, {"finetune": {"enabled": False}})
    maintainer.timeout_s = TIMEOUT_S
    team = Team(stack, origin, maintainer, work)
    maintainer.env.update(team.env())
    connect_remote(maintainer)
    maintainer.dvc("repro")
    maintainer.git("add", "dvc.lock")  # the reports are outputs: pushed with the rest
    maintainer.git("commit", "-qm", "baseline")
    maintainer.dvc("push")
    maintainer.git("push", "-q", str(origin), "HEAD:main")
    return team


@dataclass
class Teammate:
    login: dict[str, str]  # MLFLOW_TRACKING_USERNAME and _PASSWORD, from their users/NAME.env
    clone: PipelineCopy
    output: str  # what their `dvc exp run` printed


TEAMMATE_EXP = ("alice-0.30", 0.30)


@pytest.fixture(scope="session")
def alice(team: Team) -> Teammate:
    """A teammate with her own MLflow user, made as the docs say (`--add-user alice`), who has
    run one experiment (evaluate only) and not pushed it yet."""
    exported = team.stack.add_user("alice")
    variables = dict(
        line.removeprefix("export ").split("=", 1) for line in exported.read_text().splitlines()
    )
    login = {k: v for k, v in variables.items() if k.startswith("MLFLOW_TRACKING_")}
    assert login["MLFLOW_TRACKING_USERNAME"] == "alice"
    assert {k: v for k, v in variables.items() if k not in login} == {
        k: v for k, v in team.stack.client_env().items() if k not in login
    }
    member = team.clone("alice", login=login)
    name, threshold = TEAMMATE_EXP
    output = member.dvc("exp", "run", "-n", name, "-S", f"evaluate.threshold={threshold}")
    return Teammate(login, member, output)


def mlflow_client(stack: TeamStack) -> MlflowClient:
    os.environ.update(
        MLFLOW_TRACKING_USERNAME="admin",
        MLFLOW_TRACKING_PASSWORD=stack.secrets.admin_password,
    )
    return MlflowClient(stack.mlflow_url)


def executions(client: MlflowClient, names: list[str]) -> dict[str, list]:
    experiment = client.get_experiment_by_name(DEFAULT_EXPERIMENT)
    parents = client.search_runs(
        [experiment.experiment_id], filter_string="tags.`pipeline.stage` = 'pipeline'"
    )
    return {n: [p for p in parents if p.data.tags.get("dvc.exp_name") == n] for n in names}


def children(client: MlflowClient, parent) -> list:
    return client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
    )


@contextmanager
def started(member: PipelineCopy, *command: str) -> Iterator[subprocess.Popen]:
    """`command` running in `member` in the background; it and the stages DVC started are
    killed if the test leaves before it ended."""
    process = subprocess.Popen(
        command,
        cwd=member.root,
        env=member.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        yield process
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


# -- (a) the runner's job, from the workflow file itself ------------------------------------


def workflow_run_steps() -> tuple[dict[str, str], list[dict]]:
    job = yaml.safe_load(WORKFLOW.read_text())["jobs"]["experiment"]
    return job["env"], [step for step in job["steps"] if "run" in step]


def github_values(team: Team, runner_temp: Path) -> dict[str, str]:
    """What GitHub would put in each `${{ ... }}` of the workflow: the local equivalents."""
    env = team.env()
    return {
        "github.run_id": "1",
        "inputs.name || format('gpu-{0}-{1}', github.run_id, github.run_attempt)": RUNNER_EXP,
        "github.event.pull_request.base.ref || github.event.repository.default_branch": "main",
        "vars.DVC_REMOTE_URL": env["DVC_REMOTE_URL"],
        "vars.DVC_REMOTE_ENDPOINT": env["DVC_REMOTE_ENDPOINT"],
        "vars.AWS_DEFAULT_REGION": env["AWS_DEFAULT_REGION"],
        "vars.MLFLOW_TRACKING_URI": env["MLFLOW_TRACKING_URI"],
        "secrets.AWS_ACCESS_KEY_ID": env["AWS_ACCESS_KEY_ID"],
        "secrets.AWS_SECRET_ACCESS_KEY": env["AWS_SECRET_ACCESS_KEY"],
        "secrets.MLFLOW_TRACKING_USERNAME": env["MLFLOW_TRACKING_USERNAME"],
        "secrets.MLFLOW_TRACKING_PASSWORD": env["MLFLOW_TRACKING_PASSWORD"],
        "inputs.overrides": RUNNER_OVERRIDES,
        "github.token": "local-token",
    }


def substitute(value: str, values: dict[str, str]) -> str:
    """`${{ expr }}` replaced by its local value; an expression the test does not know fails
    it, so that a new variable in the workflow cannot go untested."""
    return re.sub(r"\$\{\{\s*(.+?)\s*\}\}", lambda m: values[m.group(1)], str(value))


def play_workflow(team: Team, runner: PipelineCopy) -> list[tuple[str, str]]:
    """Runs each `run:` step of the experiment job in `runner`, as GitHub runs it (bash -eo
    pipefail, the job's env and the step's), with the stand-ins above; returns each step's
    name and output."""
    stand_ins = team.work / "stand-ins"
    stand_ins.mkdir(exist_ok=True)
    for name, text in (("docker", DOCKER_STAND_IN), ("nvidia-smi", NVIDIA_SMI_STAND_IN)):
        (stand_ins / name).write_text(text)
        (stand_ins / name).chmod(0o755)
    runner_temp = team.work / "runner-temp"
    runner_temp.mkdir(exist_ok=True)
    values = github_values(team, runner_temp)
    job_env, steps = workflow_run_steps()
    base = {
        **clean_env(runner.root),  # no MLflow or AWS variables but those the steps set
        "PATH": f"{stand_ins}:{clean_env(runner.root)['PATH']}",
        "GITHUB_SERVER_URL": "https://github.invalid",
        "GITHUB_REPOSITORY": "team/dogs-vs-cats",
        "GITHUB_RUN_ID": "1",
        "GITHUB_STEP_SUMMARY": str(runner_temp / "summary.md"),
        "RUNNER_TEMP": str(runner_temp),
        "LOCAL_GIT_REMOTE": str(team.origin),
    }
    transcript = []
    for step in steps:
        env = {**base}
        env.update({k: substitute(v, values) for k, v in job_env.items()})
        env.update({k: substitute(v, values) for k, v in step.get("env", {}).items()})
        result = subprocess.run(
            ["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", step["run"]],
            cwd=runner.root,
            env=env,
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
        )
        output = result.stdout + result.stderr
        transcript.append((step["name"], output))
        assert result.returncode == 0, f"step '{step['name']}' failed:\n{output}"
    return transcript


def test_a_runner_plays_the_workflow_and_a_teammate_gets_the_experiment(team: Team) -> None:
    runner = team.clone("runner", connect=False, pull=False)  # the workflow's steps do both
    transcript = play_workflow(team, runner)
    shown = "\n".join(f"--- {name}\n{output}" for name, output in transcript)
    print(shown)  # the runner's transcript (pytest -rP shows it)
    outputs = dict(transcript)
    report = (team.work / "runner-temp" / "report" / "report.md").read_text()
    print(f"--- the job summary (report.md)\n{report}")
    assert f"### GPU experiment `{RUNNER_EXP}` vs. `origin/main`" in report
    units = TINY_PARAMS["head"]["units"]
    assert re.search(rf"\| *head\.units *\| *{units} *\| *12 *\|", report), report
    assert "train_head/metrics.json" in report, report  # the metrics diff
    assert report in (team.work / "runner-temp" / "summary.md").read_text()
    push = outputs["Push the experiment (git ref to this repository, outputs to the DVC remote)"]
    assert f"Pushed experiment {RUNNER_EXP}" in push
    assert not (runner.root / "mlflow.db").exists()  # the shared server, not SQLite

    teammate = team.clone("teammate", pull=False)
    teammate.dvc("exp", "pull", "origin", RUNNER_EXP)
    assert RUNNER_EXP in teammate.dvc("exp", "list", "--name-only")
    teammate.dvc("exp", "apply", RUNNER_EXP)
    teammate.dvc("pull")
    for model in ("head.keras", "transfer.keras", "cnn.keras"):  # finetune is off
        assert (teammate.root / "models" / model).read_bytes() == (
            runner.root / "models" / model
        ).read_bytes()
    listing = teammate.run(teammate.python, "-m", "pipeline.compare", "--csv")
    print(f"--- the teammate's python -m pipeline.compare --csv\n{listing}")
    header, *rows = listing.strip().splitlines()
    ours = [row for row in rows if RUNNER_EXP in row]
    assert len(ours) == 1 and "head.units" in header.split(",")
    assert not (teammate.root / "mlflow.db").exists()


# -- (b) who gets in --------------------------------------------------------------------------


def status_of(url: str, user: str | None = None, password: str | None = None) -> int:
    request = urllib.request.Request(f"{url}/api/2.0/mlflow/experiments/search?max_results=1")
    if user is not None:
        token = b64encode(f"{user}:{password}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def test_each_teammate_logs_in_as_themselves(team: Team, alice: Teammate) -> None:
    url, password = team.stack.mlflow_url, alice.login["MLFLOW_TRACKING_PASSWORD"]
    assert status_of(url, "alice", password) == 200
    assert status_of(url, "alice", "not-the-password") == 401
    assert status_of(url, "alice", team.stack.secrets.admin_password) == 401
    client = mlflow_client(team.stack)
    (parent,) = executions(client, [TEAMMATE_EXP[0]])[TEAMMATE_EXP[0]]
    runs = [parent, *children(client, parent)]
    assert [r.data.tags["pipeline.stage"] for r in runs] == ["pipeline", "evaluate"]
    assert [(r.info.user_id, r.data.tags["mlflow.user"]) for r in runs] == [("alice", "alice")] * 2
    assert all(r.info.status == "FINISHED" for r in runs)
    # A user nobody granted the experiment to may read it, and is refused (403) a run.
    get_app_client("basic-auth", tracking_uri=url).create_user("bob", "bob-password-1234")
    with logged_in("bob", "bob-password-1234"):
        bob = MlflowClient(url)
        assert bob.get_run(parent.info.run_id).info.run_id == parent.info.run_id
        with pytest.raises(MlflowException) as refused:
            bob.create_run(parent.info.experiment_id)
    assert "(403)" in server_problem(refused.value, url)


def test_only_the_team_gets_in_and_credentials_leak_nowhere(team: Team, alice: Teammate) -> None:
    stack, url = team.stack, team.stack.mlflow_url
    assert status_of(url) == 401
    assert status_of(url, "admin", "not-the-password") == 401
    assert status_of(url, "admin", stack.secrets.admin_password) == 200

    member = team.maintainer
    for refused in ({"MLFLOW_TRACKING_PASSWORD": "not-the-password"}, {}):
        env = {k: v for k, v in member.env.items() if not k.startswith("MLFLOW_TRACKING_")}
        env.update(MLFLOW_TRACKING_URI=url, **refused)
        if refused:
            env["MLFLOW_TRACKING_USERNAME"] = "admin"
        result = subprocess.run(
            ["python", "-m", "pipeline.split"],
            cwd=member.root,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 1
        assert result.stderr.strip().splitlines()[-1] == (
            f"split: the MLflow server at {url} refused the request (401): set "
            "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD to a user of that server "
            "that may write"
        )
        assert "Traceback" not in result.stderr

    passwords = [
        stack.secrets.admin_password,
        stack.secrets.s3_secret_key,
        stack.secrets.db_password,
        alice.login["MLFLOW_TRACKING_PASSWORD"],
    ]
    looked_at = [*stack.logs.iterdir()]
    for folder in team.work.iterdir():
        looked_at += [folder / "dvc.lock", folder / ".dvc" / "config", folder / "params.yaml"]
    looked_at += list((team.work / "runner-temp").rglob("*.md"))
    history = subprocess.run(
        ["git", "log", "-p", "--all"], cwd=team.origin, capture_output=True, text=True
    ).stdout
    client = mlflow_client(stack)
    experiment = client.get_experiment_by_name(DEFAULT_EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id])
    logged = json.dumps([[r.data.params, r.data.tags] for r in runs])
    assert runs and history
    for secret in passwords:
        for path in looked_at:
            if path.is_file():
                assert secret not in path.read_text(errors="replace"), path
        assert secret not in history and secret not in logged and secret not in alice.output


# -- (c) parallel load ------------------------------------------------------------------------

QUEUED = {"q-0.40": 0.40, "q-0.45": 0.45, "q-0.55": 0.55, "q-0.60": 0.60}
SOLO = ("solo-0.35", 0.35)


def test_parallel_experiments_from_two_clones_all_land_once_in_postgres(team: Team) -> None:
    # evaluate.threshold re-runs only evaluate: the load is on the server, not the CPU.
    queue, other = team.clone("queue"), team.clone("other")
    for name, threshold in QUEUED.items():
        queue.dvc("exp", "run", "--queue", "-n", name, "-S", f"evaluate.threshold={threshold}")
    queue.dvc("queue", "start", "--jobs", "2")
    solo_run = ("dvc", "exp", "run", "-n", SOLO[0], "-S", f"evaluate.threshold={SOLO[1]}")
    with started(other, *solo_run) as solo:
        deadline = time.monotonic() + TIMEOUT_S
        while time.monotonic() < deadline:
            status = queue.dvc("queue", "status")
            if not any(word in status for word in ("Running", "Queued")):
                break
            time.sleep(3)
        solo_output = solo.communicate(timeout=TIMEOUT_S)[0]
    assert solo.returncode == 0, solo_output
    assert status.count("Success") == 4, status

    client = mlflow_client(team.stack)
    names = [*QUEUED, SOLO[0]]
    found = executions(client, names)
    for name in names:
        assert len(found[name]) == 1, f"{name}: {len(found[name])} parent runs"
        (parent,) = found[name]
        stages = [(c.data.tags["pipeline.stage"], c.info.status) for c in children(client, parent)]
        assert stages == [("evaluate", "FINISHED")], (name, stages)
    # The runs are rows of PostgreSQL's `runs` table; no SQLite file appeared anywhere.
    import psycopg

    ids = [found[name][0].info.run_id for name in names]
    uri = team.stack.database_uri("mlflow")
    with psycopg.connect(uri, passfile=str(team.stack.pgpass)) as db:
        rows = db.execute(
            "SELECT count(*) FROM runs WHERE run_uuid = ANY(%s) OR run_uuid IN "
            "(SELECT run_uuid FROM tags WHERE key = 'mlflow.parentRunId' AND value = ANY(%s))",
            (ids, ids),
        ).fetchone()
    assert rows[0] == 2 * len(names)
    assert not [p for clone in (queue, other) for p in clone.root.rglob("*.db")]


# -- (d) faults -------------------------------------------------------------------------------


def test_a_server_gone_mid_run_fails_the_stage_in_one_line_and_a_rerun_completes(
    team: Team,
) -> None:
    stack, member = team.stack, team.clone("faults")
    client = mlflow_client(stack)
    locked = yaml.safe_load((member.root / "dvc.lock").read_text())["stages"]
    command = ["dvc", "exp", "run", "-n", "fault", "-S", "head.units=24"]
    with started(member, *command) as running:
        deadline = time.monotonic() + TIMEOUT_S
        stage_running = None
        while stage_running is None and running.poll() is None and time.monotonic() < deadline:
            for parent in executions(client, ["fault"])["fault"]:
                live = [c for c in children(client, parent) if c.info.status == "RUNNING"]
                stage_running = live[0].data.tags["pipeline.stage"] if live else None
            time.sleep(0.3)
        assert stage_running is not None, "no stage of the experiment was seen running"
        stack.stop_mlflow()
        try:
            output = running.communicate(timeout=TIMEOUT_S)[0]
        finally:
            stack.start_mlflow()
    assert running.returncode != 0
    lines = [line for line in output.splitlines() if "MLflow server" in line]
    assert lines and re.fullmatch(
        rf"\w+: cannot reach the MLflow server at {re.escape(stack.mlflow_url)}( \(.+\))?",
        lines[0],
    ), output
    assert "Traceback" not in output
    # DVC did not record the failed stage: dvc.lock still names its previous outputs, so the
    # rerun runs it again (files it had saved before the server went stay on disk until
    # then); nothing it was staging is left behind.
    after = yaml.safe_load((member.root / "dvc.lock").read_text())["stages"]
    assert after[stage_running] == locked[stage_running]
    assert not list((member.root / "models").glob(".*.tmp*"))

    rerun = member.dvc(*command[1:])
    assert "fault" in rerun
    client = mlflow_client(stack)
    (parent,) = executions(client, ["fault"])["fault"]
    runs = children(client, parent)
    assert not [r for r in runs if r.info.status == "RUNNING"]  # the lost one is FAILED now
    finished = sorted(r.data.tags["pipeline.stage"] for r in runs if r.info.status == "FINISHED")
    assert {"train_head", "evaluate"} <= set(finished)
    # The lost run, FAILED by the rerun: the same stage of the same execution ran again, or,
    # on this host, an earlier stage of the rerun found its process ended.
    abandoned = [r for r in runs if ENDED_TAG in r.data.tags]
    assert [r.data.tags["pipeline.stage"] for r in abandoned] == [stage_running]
    assert all(r.info.status == "FAILED" for r in abandoned)
    assert re.match(r"(rerun|killed): ", abandoned[0].data.tags[ENDED_TAG])
    assert client.get_run(parent.info.run_id).info.status == "FINISHED"


def test_an_s3_endpoint_down_fails_dvc_push_and_a_rerun_pushes_every_object(
    team: Team, alice: Teammate
) -> None:
    stack, member, name = team.stack, alice.clone, TEAMMATE_EXP[0]
    assert "new:" in member.dvc("status", "--cloud")  # her experiment's outputs: local only
    stack.stop_s3()
    try:
        push, exp_push = (
            subprocess.run(
                command,
                cwd=member.root,
                env=member.env,
                capture_output=True,
                text=True,
                timeout=TIMEOUT_S,
            )
            for command in (["dvc", "push"], ["dvc", "exp", "push", "origin", name])
        )
        local = member.dvc("status")
    finally:
        stack.start_s3()
    print(f"--- dvc push, the S3 endpoint down\n{push.stderr}")
    print(
        f"--- dvc exp push origin {name}, the S3 endpoint down\n{exp_push.stdout}{exp_push.stderr}"
    )
    unreachable = rf'Could not connect to the endpoint URL: "{re.escape(stack.s3_url)}/dvc/\S+"'
    assert push.returncode != 0 and exp_push.returncode != 0
    assert re.search(rf"^ERROR: unexpected error - {unreachable}$", push.stderr, re.M), push.stderr
    # dvc exp push sends the git ref first: the experiment is listed, its outputs are not there.
    assert f"Pushed experiment {name}" in exp_push.stdout
    assert re.search(rf"^ERROR: failed to push cache: {unreachable}$", exp_push.stderr, re.M)
    for output in (push.stderr, exp_push.stderr):
        assert "Traceback" not in output and stack.secrets.s3_secret_key not in output
    # Nothing lost: the outputs are in the workspace and in .dvc/cache as dvc.lock names them.
    assert "Data and pipelines are up to date." in local

    rerun = member.dvc("exp", "push", "origin", name)
    print(f"--- dvc exp push origin {name}, the endpoint back\n{rerun}")
    assert re.search(r"\d+ files? uploaded", rerun), rerun
    assert "Everything is up to date." in member.dvc("push")
    assert "Cache and remote 'storage' are in sync." in member.dvc("status", "--cloud")
