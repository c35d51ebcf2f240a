"""Register the best evaluated model and give it an alias, for `pipeline.predict`.

    python -m pipeline.registry promote                      # best test/accuracy -> @champion
    python -m pipeline.registry promote --metric test/log_loss --model transfer

Every model the training stages log carries the test metrics `evaluate` attached to it
(`test/accuracy`, `test/log_loss`, ...). Load the champion back with
`python -m pipeline.predict --model models:/dogs-vs-cats@champion photos/`, or serve it for
photos over HTTP with `make serve` (`pipeline.serving`).
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pipeline import process
from pipeline.errors import MissingInputError, TrackingError

if TYPE_CHECKING:  # MLflow is imported where used: `--help` is instant
    from mlflow.entities import LoggedModel

DEFAULT_NAME = "dogs-vs-cats"
DEFAULT_ALIAS = "champion"


@dataclass(frozen=True)
class Candidate:
    model_id: str
    name: str
    score: float


def candidates(models: Sequence[LoggedModel], metric: str, name: str | None) -> list[Candidate]:
    """Logged models that have `metric`, best first (lowest first for losses)."""
    found = []
    for model in models:
        if name and model.name != name:
            continue
        values = [m.value for m in model.metrics or [] if m.key == metric]
        if values:
            found.append(Candidate(model.model_id, model.name, values[-1]))
    return sorted(found, key=lambda c: c.score, reverse=not metric.endswith("loss"))


def promote(
    metric: str, model: str | None, registered_name: str, alias: str
) -> tuple[Candidate, str]:
    """Registers the best candidate under `registered_name` and points `alias` at it."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from pipeline import tracking

    experiment = mlflow.get_experiment_by_name(tracking.experiment_name())
    if experiment is None:
        raise LookupError(f"no MLflow experiment '{tracking.experiment_name()}' yet")
    logged = mlflow.search_logged_models([experiment.experiment_id], output_format="list")
    ranked = candidates(logged, metric, model)
    if not ranked:
        raise LookupError(f"no logged model has the metric '{metric}': run the pipeline first")
    best = ranked[0]
    client, source = MlflowClient(), f"models:/{best.model_id}"
    # Promoting the same model again reuses its version rather than adding one.
    existing = [
        version
        for version in client.search_model_versions(f"name = '{registered_name}'")
        if version.source == source
    ]
    version = existing[0] if existing else mlflow.register_model(source, registered_name)
    client.set_registered_model_alias(registered_name, alias, version.version)
    return best, version.version


def name_problem(name: str) -> str | None:
    if not name.strip() or "/" in name or ":" in name:
        return f"--name {name!r}: give a non-empty name without '/' or ':'"
    return None


def alias_problem(alias: str) -> str | None:
    """MLflow reserves `latest` and `v<N>`, which name versions, and allows letters, digits,
    '_' and '-' only."""
    if alias.lower() == "latest" or re.fullmatch(r"[vV]\d+", alias):
        return f"--alias {alias!r} is reserved by MLflow for versions; choose another"
    if not re.fullmatch(r"[\w-]+", alias):
        return f"--alias {alias!r}: use letters, digits, '_' and '-' only"
    return None


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.registry",
        description=__doc__,
        formatter_class=process.HelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    command = commands.add_parser(
        "promote",
        help="register the best evaluated model and alias it",
        description="Register the logged model with the best --metric under --name and point\n"
        "--alias at that version; promoting the same model again reuses its version.",
        formatter_class=process.HelpFormatter,
    )
    command.add_argument(
        "--metric",
        default="test/accuracy",
        help="the test metric evaluate attached to each model (test/roc_auc, test/log_loss, "
        "...); highest wins, lowest for *loss",
    )
    command.add_argument(
        "--model",
        choices=("cnn", "transfer", "finetuned"),
        help="only this kind of model (default: any)",
    )
    command.add_argument("--name", default=DEFAULT_NAME, help="the registered model's name")
    command.add_argument(
        "--alias", default=DEFAULT_ALIAS, help="the alias: models:/<name>@<alias> loads it"
    )
    args = parser.parse_args(argv)
    if problem := name_problem(args.name) or alias_problem(args.alias):
        parser.error(problem)
    import mlflow
    from mlflow.exceptions import MlflowException

    from pipeline import tracking

    mlflow.set_tracking_uri(tracking.tracking_uri())
    try:
        best, version = promote(args.metric, args.model, args.name, args.alias)
    except LookupError as error:
        raise MissingInputError(str(error)) from None
    except MlflowException as error:
        raise TrackingError(f"MLflow refused: {error.message}") from None
    print(
        f"registry: {best.name} model {best.model_id} ({args.metric} {best.score:.4f}) is "
        f"version {version} of '{args.name}', alias @{args.alias}: "
        f"models:/{args.name}@{args.alias}"
    )


if __name__ == "__main__":
    process.run(main)
