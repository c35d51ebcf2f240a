"""A throwaway copy of this repository, with tiny params, in which tests and benchmarks run
DVC for real."""

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


def copy_repository(target: Path) -> None:
    """The files git tracks, and the untracked ones it does not ignore (work not committed
    yet is tested too), copied to `target`: what a clone of the working tree would hold."""
    for name in tracked_files(REPO_ROOT):
        source = REPO_ROOT / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)


def makefile_env(root: Path, venv: Path) -> dict[str, str]:
    """PATH and VIRTUAL_ENV as the Makefile exports them to its recipes for `venv`: asked of
    make itself, so that the tests' DVC runs the stages with the interpreter `make` gives them,
    and a Makefile that stopped doing so would fail them."""
    recipe = 'print-env:\n\t@printf "%s\\n%s\\n" "$$PATH" "$$VIRTUAL_ENV"\n'
    make = ["make", "-s", "--no-print-directory", "-f", "Makefile", "-f", "-"]
    printed = subprocess.run(
        [*make, f"VENV={venv}", "print-env"],
        cwd=root,
        input=recipe,
        capture_output=True,
        text=True,
        check=True,
    )
    path, virtual_env = printed.stdout.splitlines()
    return {"PATH": path, "VIRTUAL_ENV": virtual_env}


def clean_env(root: Path) -> dict[str, str]:
    """The environment for DVC and the stages, as `make pipeline` gives it (this venv first on
    PATH, no PYTHONPATH: the stages import the `pipeline/` of the folder they run in), without
    an outside MLflow or DVC configuration."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("MLFLOW_", "DVC_")) and k != "PYTHONPATH"
    }
    env.update(makefile_env(root, Path(sys.prefix)))
    env.update(
        GIT_AUTHOR_NAME="test",
        GIT_AUTHOR_EMAIL="test@example.com",
        GIT_COMMITTER_NAME="test",
        GIT_COMMITTER_EMAIL="test@example.com",
        DVC_NO_ANALYTICS="1",
        TF_CPP_MIN_LOG_LEVEL="2",
    )
    return env


def probe_env(root: Path) -> dict[str, str]:
    """`clean_env` plus PYTHONPATH, for `python -c` probes that import `pipeline`, `bench`,
    `devtools` or `tests` from outside the repository."""
    return {**clean_env(root), "PYTHONPATH": str(root)}


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
        copy_repository(target)
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
        return "python"  # the venv's, first on PATH as under make

    def git(self, *args: str) -> str:
        return self.run("git", *args)

    def dvc(self, *args: str, check: bool = True) -> str:
        return self.run("dvc", *args, check=check)  # the venv's, found on PATH as make finds it

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
