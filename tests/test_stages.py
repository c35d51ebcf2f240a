"""Each stage, run as DVC runs it, refuses clearly when its inputs are missing or wrong,
and logs to MLflow exactly the params dvc.yaml gives it."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from pipeline.config import ConfigError
from pipeline.devices import ComputePlan
from pipeline.errors import MissingInputError, PipelineError
from tests.conftest import set_params
from tests.test_stage import dvc_declared

PLAN_KEYS = set(ComputePlan("cpu", "float32", ("/CPU:0",)).params(1))


@pytest.mark.parametrize(
    ("stage", "message"),
    [
        ("split", "both cats and dogs"),
        ("augment", "run the split stage"),
        ("train_cnn", "run the split stage first"),
        ("extract_features", "run the split stage first"),
        ("train_head", "run the extract_features stage first"),
        ("finetune", "run the pipeline up to train_head"),
        ("evaluate", "run the training stages first"),
    ],
)
def test_a_stage_without_its_inputs_fails_with_a_hint_on_its_failed_run(
    stage_workspace, stage, message
):
    from mlflow import MlflowClient

    from pipeline import tracking

    (stage_workspace / "data" / "raw").mkdir(parents=True)
    module = importlib.import_module(f"pipeline.{stage}")
    with pytest.raises(PipelineError) as error:
        module.main()
    assert message in str(error.value) and "\n" not in str(error.value)
    client = MlflowClient(tracking.tracking_uri())
    [run] = client.search_runs(
        [client.get_experiment_by_name(tracking.experiment_name()).experiment_id],
        filter_string=f"tags.`{tracking.STAGE_TAG}` = '{stage}'",
    )
    assert run.info.status == "FAILED"
    assert run.data.tags["error"] == str(error.value)
    # What the compute plan resolved to (device, replicas, ...) is logged beside the params.
    assert set(run.data.params) - PLAN_KEYS == dvc_declared(stage)


def test_a_disabled_finetune_without_the_transfer_model_exits_with_a_hint(stage_workspace):
    from pipeline import finetune

    set_params(stage_workspace, "finetune", enabled=False)
    with pytest.raises(
        MissingInputError, match=r"transfer\.keras is missing; run train_head first"
    ):
        finetune.main()
    assert not (stage_workspace / "models").exists()


def test_train_head_without_a_loadable_backbone_exits_before_writing(stage_workspace):
    import numpy as np

    from pipeline import train_head

    features = stage_workspace / "data" / "features"
    features.mkdir(parents=True)
    for split in ("train", "validation"):
        np.savez(
            features / f"{split}.npz",
            features=np.zeros((8, 4), np.float16),
            labels=np.array([0, 1] * 4),
            files=np.array([f"{split}/cats/{i}.jpg" for i in range(8)]),
        )
    (stage_workspace / "models").mkdir()
    (stage_workspace / "models" / "backbone.keras").write_bytes(b"cut short")
    with pytest.raises(MissingInputError, match=r"cannot load models/backbone\.keras"):
        train_head.main()
    assert [p.name for p in (stage_workspace / "models").iterdir()] == ["backbone.keras"]
    assert not (stage_workspace / "reports").exists()


def test_invalid_params_stop_a_stage_before_it_touches_anything(stage_workspace: Path):
    from pipeline import download

    set_params(stage_workspace, "split", validation_fraction=0.9, test_fraction=0.5)
    set_params(stage_workspace, "head", learning_rate=-1)
    with pytest.raises(ConfigError) as error:
        download.main()
    message = str(error.value)
    assert "split: validation_fraction + test_fraction must be below 1" in message
    assert "head.learning_rate" in message
    assert sorted(p.name for p in stage_workspace.iterdir()) == ["dvc.yaml", "params.yaml"]
