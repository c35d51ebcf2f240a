"""A throwaway copy of this repository, with tiny params, in which tests run DVC for real."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from mlflow.entities import Experiment
from mlflow.tracking import MlflowClient

from pipeline.tracking import DEFAULT_EXPERIMENT

REPO_ROOT = Path(__file__).resolve().parents[1]

# Small enough for a 2-core CI machine: 32x32 images are the smallest VGG16 accepts.
TINY_PARAMS: dict[str, dict[str, Any]] = {
    "split": {"validation_fraction": 0.25, "test_fraction": 0.25},
    "augment": {"variants": 1, "image_size": [32, 32]},
    "train_cnn": {
        "image_size": [32, 32],
        "stem_filters": 4,
        "block_filters": [8, 8],
        "convs_per_block": 1,
        "top_filters": 8,
        "batch_size": 8,
        "epochs": 2,
        "patience": 2,
    },
    "features": {"weights": "none", "image_size": [32, 32], "batch_size": 16},
    "head": {"units": 16, "batch_size": 8, "epochs": 2, "patience": 2},
    "finetune": {"enabled": True, "batch_size": 8, "epochs": 1},
}


def tracked_files(root: Path) -> list[str]:
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=root,
        capture_output=True,
        text=True,
        check=True,
    )
    return [name for name in listed.stdout.split("\0") if name]


def clean_env(root: Path) -> dict[str, str]:
    """The environment for DVC and the stages: this venv's python first, no outside MLflow."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(
        GIT_AUTHOR_NAME="test",
        GIT_AUTHOR_EMAIL="test@example.com",
        GIT_COMMITTER_NAME="test",
        GIT_COMMITTER_EMAIL="test@example.com",
        DVC_NO_ANALYTICS="1",
        TF_CPP_MIN_LOG_LEVEL="2",
        PYTHONPATH=str(root),
    )
    return env


@dataclass
class PipelineCopy:
    root: Path
    env: dict[str, str] = field(default_factory=dict)
    first_repro_output: str = ""
    # A guard for the tests' tiny runs; a benchmark at full size may take hours (None).
    timeout_s: float | None = 900

    @classmethod
    def create(
        cls, target: Path, dataset: Path, overrides: dict | None = None, tiny: bool = True
    ) -> PipelineCopy:
        """A git+DVC copy reading `dataset`: with TINY_PARAMS, or the repository's own."""
        for name in tracked_files(REPO_ROOT):
            source = REPO_ROOT / name
            if source.is_file():
                (target / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, target / name)
        copy = cls(root=target, env=clean_env(target))
        params = yaml.safe_load((target / "params.yaml").read_text())
        merged = {**(TINY_PARAMS if tiny else {}), **(overrides or {})}
        merged["download"] = {"source": "local", "local_path": str(dataset)}
        for section, values in merged.items():
            params[section].update(values)
        (target / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        copy.git("init", "-q")
        copy.git("add", "-A")
        copy.git("commit", "-qm", "tiny pipeline")
        return copy

    @property
    def python(self) -> str:
        return sys.executable

    def git(self, *args: str) -> str:
        return self.run("git", *args)

    def dvc(self, *args: str, check: bool = True) -> str:
        return self.run(sys.executable, "-m", "dvc", *args, check=check)

    def run(self, *command: str, check: bool = True) -> str:
        result = subprocess.run(
            command,
            cwd=self.root,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=self.timeout_s,
        )
        output = result.stdout + result.stderr
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(command)} failed ({result.returncode}):\n{output}")
        return output

    def set_param(self, section: str, key: str, value: Any) -> None:
        path = self.root / "params.yaml"
        params = yaml.safe_load(path.read_text())
        params[section][key] = value
        path.write_text(yaml.safe_dump(params, sort_keys=False))

    def mlflow(self) -> tuple[MlflowClient, Experiment]:
        client = MlflowClient(tracking_uri=f"sqlite:///{self.root / 'mlflow.db'}")
        experiment = client.get_experiment_by_name(DEFAULT_EXPERIMENT)
        assert experiment is not None, "no MLflow experiment was created"
        return client, experiment
