from __future__ import annotations

from dataclasses import dataclass

from mlflow.entities import Metric

from pipeline.registry import candidates


@dataclass
class FakeModel:
    model_id: str
    name: str
    metrics: list[Metric]


MODELS = [
    FakeModel(
        "m-1", "cnn", [Metric("test/accuracy", 0.7, 0, 0), Metric("test/log_loss", 0.6, 0, 0)]
    ),
    FakeModel(
        "m-2", "transfer", [Metric("test/accuracy", 0.9, 0, 0), Metric("test/log_loss", 0.3, 0, 0)]
    ),
    FakeModel(
        "m-3", "transfer", [Metric("test/accuracy", 0.8, 0, 0), Metric("test/log_loss", 0.2, 0, 0)]
    ),
    FakeModel("m-4", "cnn", []),  # trained but never evaluated
]


def test_best_model_first_higher_or_lower_as_the_metric_wants() -> None:
    assert [c.model_id for c in candidates(MODELS, "test/accuracy", None)] == ["m-2", "m-3", "m-1"]
    assert [c.model_id for c in candidates(MODELS, "test/log_loss", None)] == ["m-3", "m-2", "m-1"]


def test_candidates_can_be_limited_to_one_kind() -> None:
    assert [c.model_id for c in candidates(MODELS, "test/accuracy", "cnn")] == ["m-1"]
    assert candidates(MODELS, "test_f1", None) == []


def test_names_and_aliases_mlflow_would_refuse_are_caught_first() -> None:
    from pipeline.registry import alias_problem, name_problem

    assert alias_problem("champion") is None and alias_problem("staging-2") is None
    for reserved in ("latest", "Latest", "v1", "V12"):
        assert "reserved" in alias_problem(reserved)
    assert "letters, digits" in alias_problem("my alias")
    assert name_problem("dogs-vs-cats") is None
    for bad in ("", "  ", "a/b", "models:x"):
        assert "non-empty name" in name_problem(bad)
