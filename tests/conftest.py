"""Tiny generated data for every test: no test reads the network or the real dataset."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from devtools.fakes import jpeg_bytes, photo, write_kaggle_tree
from pipeline.config import Config, load_config
from pipeline.images import LabeledImage, list_split

if TYPE_CHECKING:
    import keras  # imported where used: most tests need no TensorFlow

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def float32_after_each_test():
    """Keras's dtype policy is global: a stage run in-process on a CPU with bfloat16 leaves
    `mixed_bfloat16` set, and the next test would build its models under it."""
    yield
    if "keras" in sys.modules:
        sys.modules["keras"].mixed_precision.set_global_policy("float32")


def write_split_folder(root: Path, per_class: int) -> list[LabeledImage]:
    """`root/{cats,dogs}/N.jpg`, the layout of the split and augment stages' outputs."""
    for label, name in enumerate(("cats", "dogs")):
        (root / name).mkdir(parents=True, exist_ok=True)
        for n in range(per_class):
            (root / name / f"{n}.jpg").write_bytes(jpeg_bytes(photo(label, seed=100 * label + n)))
    return list_split(root)


def write_petimages_tree(root: Path, per_class: int) -> list[Path]:
    """`root/PetImages/Cat/N.jpg` and `root/PetImages/Dog/N.jpg`, the public mirror's layout."""
    paths = []
    for label, name in enumerate(("Cat", "Dog")):
        folder = root / "PetImages" / name
        folder.mkdir(parents=True, exist_ok=True)
        for n in range(per_class):
            path = folder / f"{n}.jpg"
            path.write_bytes(jpeg_bytes(photo(label, seed=label * 10_000 + n)))
            paths.append(path)
    return paths


def run_stage_without_tensorflow(stage: str, workspace: Path) -> str:
    """Runs `python -m pipeline.<stage>` in `workspace`, in a fresh interpreter so that
    `sys.modules` tells what the stage itself imported; asserts it succeeded without importing
    TensorFlow or MLflow (a stage that is off logs no run), and returns what it printed."""
    code = (
        f"import runpy, sys; runpy.run_module('pipeline.{stage}', run_name='__main__'); "
        "sys.exit(bool({'tensorflow', 'mlflow'} & set(sys.modules)))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=workspace,
        env={"PYTHONPATH": str(REPO_ROOT), "PATH": ""},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr or "it imported TensorFlow or MLflow"
    return result.stdout


def snapshot(*folders: Path) -> dict[Path, bytes]:
    """Every file under `folders` with its bytes: what a failed stage must leave unchanged."""
    return {path: path.read_bytes() for f in folders for path in f.rglob("*") if path.is_file()}


def zip_tree(root: Path, archive: Path) -> Path:
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(root.rglob("*")):
            if path.is_file():
                zf.write(path, path.relative_to(root).as_posix())
    return archive


@pytest.fixture(scope="session")
def repo_config() -> Config:
    return load_config(REPO_ROOT / "params.yaml")


@pytest.fixture
def kaggle_zip(tmp_path: Path) -> Path:
    source = tmp_path / "kaggle-src"
    write_kaggle_tree(source, per_class=12)
    return zip_tree(source, tmp_path / "train.zip")


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory: pytest.TempPathFactory):
    """A repository copy on which `dvc repro` has run once, shared by the slow tests."""
    from devtools.pipeline_copy import PipelineCopy

    data = tmp_path_factory.mktemp("dataset")
    write_kaggle_tree(data / "src", per_class=16)
    archive = zip_tree(data / "src", data / "dogs-vs-cats.zip")
    copy = PipelineCopy.create(tmp_path_factory.mktemp("repo"), archive)
    # MLflow samples system metrics every 10 s by default, longer than a tiny stage runs.
    copy.env.update(
        MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL="0.5",
        MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING="1",
    )
    copy.first_repro_output = copy.dvc("repro")
    return copy


@pytest.fixture
def stage_workspace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kaggle_zip: Path) -> Path:
    """A folder with tiny params.yaml and the repository's dvc.yaml (which names each stage's
    params), as cwd, where a stage's `main()` can run in-process."""
    import yaml

    from devtools.pipeline_copy import TINY_PARAMS

    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    for section, values in TINY_PARAMS.items():
        params[section].update(values)
    params["download"].update(source="local", local_path=str(kaggle_zip))
    workspace = tmp_path / "workspace"
    workspace.mkdir()
    (workspace / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    shutil.copy(REPO_ROOT / "dvc.yaml", workspace / "dvc.yaml")
    monkeypatch.chdir(workspace)
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "DVC_EXP_NAME", "DVC_ROOT"):
        monkeypatch.setenv(name, "")  # so teardown removes what mlflow exports
        monkeypatch.delenv(name)
    yield workspace
    import mlflow

    mlflow.end_run()


def set_params(workspace: Path, section: str, **values) -> None:
    import yaml

    path = workspace / "params.yaml"
    params = yaml.safe_load(path.read_text())
    params[section].update(values)
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def tiny_config():
    """`params.yaml` at the end-to-end test's tiny sizes: every test's config starts here."""
    import yaml

    from devtools.pipeline_copy import TINY_PARAMS
    from pipeline.config import parse_config

    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    for section, values in TINY_PARAMS.items():
        params[section].update(values)
    return parse_config(params)


def dtype_policies(model: keras.Model) -> set[str]:
    """The dtype policies of `model`'s layers, nested models' layers included."""
    import keras

    names = set()
    for layer in model.layers:
        names |= dtype_policies(layer) if isinstance(layer, keras.Model) else set()
        names.add(layer.dtype_policy.name)
    return names
