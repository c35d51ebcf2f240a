from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from pipeline.config import ConfigError, flatten, load_config, parse_config
from tests.conftest import REPO_ROOT


@pytest.fixture
def raw_params() -> dict:
    return yaml.safe_load((REPO_ROOT / "params.yaml").read_text())


def with_changes(raw: dict, **changes) -> dict:
    changed = copy.deepcopy(raw)
    for dotted, value in changes.items():
        *parents, key = dotted.split("__")
        node = changed
        for parent in parents:
            node = node[parent]
        node[key] = value
    return changed


def test_repository_params_are_valid(repo_config) -> None:
    assert repo_config.common.seed == 42
    assert repo_config.train_cnn.block_filters == [64, 128, 256]
    assert repo_config.paths.models.cnn == Path("models/cnn.keras")


def test_config_is_frozen(repo_config) -> None:
    with pytest.raises(ValueError):
        repo_config.head.units = 3


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"head__learning_rate": -0.1}, "head.learning_rate: Input should be greater than 0"),
        (
            {"split__validation_fraction": 1.5},
            "split.validation_fraction: Input should be less than 1",
        ),
        ({"split__validation_fraction": 0.6, "split__test_fraction": 0.5}, "must be below 1"),
        (
            {"download__source": "ftp"},
            "download.source: Input should be 'petimages', 'kaggle' or 'local'",
        ),
        ({"download__source": "local"}, "needs download.local_path"),
        (
            {"download__source": "local", "download__local_path": ""},
            "download.local_path: is empty",
        ),
        ({"paths__split": "data/raw"}, "paths.raw (data/raw) overlaps paths.split (data/raw)"),
        ({"paths__features": "data/raw/features"}, "paths.features (data/raw/features) overlaps"),
        (
            {"train_cnn__block_filters": [8] * 6, "train_cnn__image_size": [48, 48]},
            "train_cnn: a stem and 6 blocks halve the image 7 times: image_size must be at "
            "least 128x128, got 48x48",
        ),
        (
            {"train_cnn__warmup_epochs": 30},
            "train_cnn: warmup_epochs (30) must be below epochs (12)",
        ),
        (
            {"train_cnn__optimizer": "lamb"},
            "train_cnn.optimizer: Input should be 'adamw', 'adam', 'sgd' or 'rmsprop'",
        ),
        (
            {"compute__steps_per_execution": 0},
            "compute.steps_per_execution: Input should be greater than 0",
        ),
        (
            {"features__backbone": "alexnet"},
            "features.backbone: Input should be 'vgg16', 'resnet50'",
        ),
        (
            {"features__backbone": "xception", "features__image_size": [64, 64]},
            "features: xception needs image_size of at least 71x71, got 64x64",
        ),
        ({"features__weights": "weights.bin"}, "features.weights: must be 'imagenet', 'none'"),
        ({"train_cnn__optimizer": "adagrad"}, "train_cnn.optimizer: Input should be"),
        ({"train_cnn__epochs": "ten"}, "train_cnn.epochs: Input should be a valid integer"),
        ({"head__lerning_rate": 0.1}, "head.lerning_rate: unknown key (a typo of learning_rate?)"),
        (
            {"train_cnn__random_augment__horizontl_flip": True},
            "train_cnn.random_augment.horizontl_flip: unknown key (a typo of horizontal_flip?)",
        ),
        ({"head__colour": "red"}, "head.colour: unknown key (a typo?)"),
        (
            {"augment__image_size": [8, 8]},
            "augment.image_size.0: Input should be greater than or equal to 32",
        ),
    ],
)
def test_bad_values_are_named_with_their_path(raw_params, changes, expected) -> None:
    with pytest.raises(ConfigError) as error:
        parse_config(with_changes(raw_params, **changes))
    assert expected in str(error.value)


def test_every_bad_field_is_reported_at_once(raw_params) -> None:
    bad = with_changes(raw_params, head__units=0, train_cnn__dropout=1.5, evaluate__threshold=2)
    with pytest.raises(ConfigError) as error:
        parse_config(bad)
    message = str(error.value)
    assert "3 invalid value(s)" in message
    for field in ("head.units", "train_cnn.dropout", "evaluate.threshold"):
        assert field in message


def test_missing_section_is_reported(raw_params) -> None:
    del raw_params["head"]
    with pytest.raises(ConfigError, match="head: Field required"):
        parse_config(raw_params)


def test_unreadable_files_give_clear_errors(tmp_path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "params.yaml")
    (tmp_path / "params.yaml").write_text("head: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "params.yaml")
    (tmp_path / "params.yaml").write_text("- a list")
    with pytest.raises(ConfigError, match="mapping of sections"):
        load_config(tmp_path / "params.yaml")


def test_flatten_uses_dotted_names_like_dvc(repo_config) -> None:
    flat = flatten({"head": repo_config.head.model_dump(mode="json")})
    assert flat["head.learning_rate"] == 0.0001
    assert all(name.startswith("head.") for name in flat)


@pytest.mark.parametrize("renamed", [False, True], ids=["added-beside", "instead-of"])
def test_a_misspelt_top_level_section_is_refused_by_name(raw_params, tmp_path, renamed) -> None:
    raw_params["trian_cnn"] = {"epochs": 1}
    if renamed:
        raw_params["trian_cnn"] = raw_params.pop("train_cnn")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw_params))
    with pytest.raises(ConfigError) as error:
        load_config(tmp_path / "params.yaml")
    assert "  - trian_cnn: unknown key (a typo of train_cnn?)" in str(error.value)


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"\x80", "is not UTF-8 text (byte 0)"),
        (b"{", "is not valid YAML: expected the node content, but found '<stream end>' (line 1,"),
    ],
    ids=["not-utf8", "cut-yaml"],
)
def test_an_unreadable_params_file_is_one_line(tmp_path, content, expected) -> None:
    """Found by tests/test_fuzz.py: a traceback (not UTF-8), or PyYAML's multi-line quote."""
    (tmp_path / "params.yaml").write_bytes(content)
    with pytest.raises(ConfigError) as error:
        load_config(tmp_path / "params.yaml")
    assert expected in str(error.value) and "\n" not in str(error.value)
