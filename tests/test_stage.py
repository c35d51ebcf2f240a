"""The stage context: config, MLflow run with the params dvc.yaml declares, failures."""

from __future__ import annotations

import functools
import os

import pytest
import yaml

from pipeline import stage
from pipeline.config import ConfigError, flatten
from pipeline.errors import MissingInputError
from tests.conftest import REPO_ROOT

STAGES = list(yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"])


@functools.cache
def dvc_declared(name: str) -> frozenset[str]:
    """The params DVC itself says `name` depends on, flattened: the oracle."""
    import dvc.api

    here = os.getcwd()
    os.chdir(REPO_ROOT)  # DVC reads params.yaml from the working directory, whatever `repo` is
    try:
        return frozenset(flatten(dvc.api.params_show(stages=name)))
    finally:
        os.chdir(here)


def logged_run(run_id: str):
    from mlflow import MlflowClient

    from pipeline import tracking

    return MlflowClient(tracking.tracking_uri()).get_run(run_id)


@pytest.mark.parametrize("name", STAGES)
def test_each_stage_logs_exactly_the_params_dvc_yaml_gives_it(stage_workspace, name) -> None:
    with stage.context(name) as ctx:
        run_id = ctx.run.info.run_id
    assert set(logged_run(run_id).data.params) == dvc_declared(name)


def test_the_params_that_drifted_are_the_declared_ones_now(repo_config) -> None:
    """evaluate read finetune.enabled but logged all of finetune; extract_features logged
    features.include_augmented, which only extract_augmented_features reads."""
    dvc_file = REPO_ROOT / "dvc.yaml"
    evaluate = stage.declared_params("evaluate", repo_config, dvc_file)
    assert {k for k in evaluate if k.startswith("finetune.")} == {"finetune.enabled"}
    assert evaluate["finetune.enabled"] == repo_config.finetune.enabled
    features = stage.declared_params("extract_features", repo_config, dvc_file)
    assert "features.include_augmented" not in features
    assert features["features.backbone"] == repo_config.features.backbone
    assert "features.include_augmented" in stage.declared_params(
        "extract_augmented_features", repo_config, dvc_file
    )


def test_a_param_dvc_yaml_names_that_the_config_lacks_is_refused(tmp_path, repo_config) -> None:
    dvc_file = tmp_path / "dvc.yaml"
    dvc_file.write_text(yaml.safe_dump({"stages": {"split": {"params": ["split.ratio"]}}}))
    with pytest.raises(ConfigError, match=r"gives split the param split\.ratio"):
        stage.declared_params("split", repo_config, dvc_file)
    with pytest.raises(ConfigError, match="not found: run from the repository root"):
        stage.declared_params("split", repo_config, tmp_path / "missing.yaml")


def test_a_pipeline_error_fails_the_run_naming_the_cause_and_keeps_its_line(
    stage_workspace,
) -> None:
    from mlflow import MlflowClient

    from pipeline import tracking

    with pytest.raises(MissingInputError), stage.context("split") as ctx:
        raise MissingInputError("data/raw is empty; run the download stage first")
    client = MlflowClient(tracking.tracking_uri())
    run = client.get_run(ctx.run.info.run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags[stage.ERROR_TAG] == "data/raw is empty; run the download stage first"
    parent = client.get_run(tracking.parent_run_id(run))
    assert parent.data.tags[tracking.FAILED_STAGE_TAG] == "split"


def test_a_bug_fails_the_run_without_an_error_tag_and_keeps_its_traceback(
    stage_workspace,
) -> None:
    with pytest.raises(ZeroDivisionError), stage.context("split") as ctx:
        1 / 0  # noqa: B018
    run = logged_run(ctx.run.info.run_id)
    assert run.info.status == "FAILED"
    assert stage.ERROR_TAG not in run.data.tags


def test_a_stage_that_is_off_opens_no_run(stage_workspace) -> None:
    """(Nor does it import MLflow: `conftest.run_stage_without_tensorflow` checks.)"""
    with stage.context("finetune", tracked=lambda cfg: False) as ctx:
        assert ctx.run is None and ctx.plan is None
    assert sorted(p.name for p in stage_workspace.iterdir()) == ["dvc.yaml", "params.yaml"]
