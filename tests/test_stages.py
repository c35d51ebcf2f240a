"""Each stage, run as DVC runs it, refuses clearly when its inputs are missing or wrong."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from tests.conftest import set_params


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
def test_a_stage_without_its_inputs_exits_with_a_hint(stage_workspace, stage, message):
    (stage_workspace / "data" / "raw").mkdir(parents=True)
    module = importlib.import_module(f"pipeline.{stage}")
    with pytest.raises(SystemExit) as exit_info:
        module.main()
    assert message in str(exit_info.value.code)


def test_a_disabled_finetune_without_the_transfer_model_exits_with_a_hint(stage_workspace):
    from pipeline import finetune

    set_params(stage_workspace, "finetune", enabled=False)
    with pytest.raises(SystemExit) as exit_info:
        finetune.main()
    assert "transfer.keras is missing; run train_head first" in str(exit_info.value.code)
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
    with pytest.raises(SystemExit) as exit_info:
        train_head.main()
    assert "cannot load models/backbone.keras" in str(exit_info.value.code)
    assert [p.name for p in (stage_workspace / "models").iterdir()] == ["backbone.keras"]
    assert not (stage_workspace / "reports").exists()


def test_invalid_params_stop_a_stage_before_it_touches_anything(stage_workspace: Path):
    from pipeline import download

    set_params(stage_workspace, "split", validation_fraction=0.9, test_fraction=0.5)
    set_params(stage_workspace, "head", learning_rate=-1)
    with pytest.raises(SystemExit) as exit_info:
        download.main()
    message = str(exit_info.value.code)
    assert "split: validation_fraction + test_fraction must be below 1" in message
    assert "head.learning_rate" in message
    assert sorted(p.name for p in stage_workspace.iterdir()) == ["params.yaml"]
