"""Compare pipeline executions in MLflow: one row per execution, the params that differ.

    python -m pipeline.compare                       # sorted by transfer/test/accuracy
    python -m pipeline.compare --metric cnn/test/log_loss --markdown
    python -m pipeline.compare --csv > runs.csv

Reads through MLflow's search API, so it works the same against the local SQLite store and
a shared tracking server (`MLFLOW_TRACKING_URI`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from pipeline import process
from pipeline.errors import BadInputError, MissingInputError, TrackingError

if TYPE_CHECKING:  # pandas and MLflow are imported where used: `--help` is instant
    import pandas as pd

DEFAULT_METRIC = "transfer/test/accuracy"
SHOWN_METRICS = ("accuracy", "roc_auc", "log_loss")
LOWER_IS_BETTER = ("loss",)


def lower_is_better(metric: str) -> bool:
    return metric.endswith(LOWER_IS_BETTER)


def executions(experiment_name: str) -> pd.DataFrame:
    """The parent run of every pipeline execution in the experiment, newest first."""
    import mlflow
    import pandas as pd

    from pipeline import tracking

    experiment = mlflow.get_experiment_by_name(experiment_name)
    if experiment is None:
        return pd.DataFrame()
    return mlflow.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.`{tracking.STAGE_TAG}` = 'pipeline'",
        order_by=["attributes.start_time DESC"],
    )


def comparison(runs: pd.DataFrame, metric: str) -> pd.DataFrame:
    """One row per execution: its name, the params that differ between rows, test metrics."""
    import pandas as pd

    from pipeline import tracking

    if runs.empty:
        return pd.DataFrame()
    param_columns = [c for c in runs.columns if c.startswith("params.")]
    differing = [c for c in param_columns if runs[c].astype(str).nunique(dropna=False) > 1]
    metric_columns = [
        f"metrics.{model}/test/{name}"
        for model in ("cnn", "transfer", "finetuned")
        for name in SHOWN_METRICS
        if f"metrics.{model}/test/{name}" in runs
    ]
    if f"metrics.{metric}" not in metric_columns:
        metric_columns.append(f"metrics.{metric}")
    table = pd.DataFrame(
        {
            "run": runs["tags.mlflow.runName"],
            "dvc_exp": runs.get(f"tags.{tracking.DVC_EXP_TAG}"),
            "commit": runs.get(f"tags.{tracking.COMMIT_TAG}", pd.Series(dtype=str)).str[:7],
            "run_id": runs["run_id"],
        }
    )
    for column in differing:
        table[column.removeprefix("params.")] = runs[column]
    for column in metric_columns:
        table[column.removeprefix("metrics.")] = runs.get(column)
    sort_key = metric if metric in table else None
    if sort_key:
        table = table.sort_values(sort_key, ascending=lower_is_better(metric), na_position="last")
    return table.reset_index(drop=True)


def to_markdown(table: pd.DataFrame) -> str:
    """Metrics to four places, blank where a run has none; params as MLflow logged them, as
    text (a learning rate of `1e-05` must not read `0.0000`)."""
    import pandas as pd

    text = [i for i, column in enumerate(table) if not pd.api.types.is_float_dtype(table[column])]
    cells = table.astype(object).where(table.notna(), None)  # tabulate blanks None, not NaN
    return (
        cells.to_markdown(index=False, floatfmt=".4f", missingval="", disable_numparse=text) + "\n"
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.compare",
        description=__doc__,
        formatter_class=process.HelpFormatter,
    )
    parser.add_argument(
        "--metric",
        default=DEFAULT_METRIC,
        help="the metric to sort by, best first (lowest first for *loss); also shown",
    )
    parser.add_argument(
        "--experiment",
        help="the MLflow experiment to read (default: $MLFLOW_EXPERIMENT_NAME, else dogs-vs-cats)",
    )
    parser.add_argument(
        "--limit", type=process.positive_int, default=50, help="show at most this many rows"
    )
    output = parser.add_mutually_exclusive_group()
    output.add_argument("--csv", action="store_true", help="CSV on standard output")
    output.add_argument("--markdown", action="store_true", help="a Markdown table")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    import mlflow
    import pandas as pd
    from mlflow.exceptions import MlflowException

    from pipeline import tracking

    args.experiment = args.experiment or tracking.experiment_name()
    mlflow.set_tracking_uri(tracking.tracking_uri())
    try:
        runs = executions(args.experiment)
    except MlflowException as error:  # an unreachable or refusing tracking server
        uri = tracking.tracking_uri()
        problem = tracking.server_problem(error, uri)
        message = problem or f"cannot read {tracking.shown_uri(uri)}: {error.message}"
        raise TrackingError(message) from None
    if runs.empty:
        raise MissingInputError(f"no pipeline executions in experiment '{args.experiment}' yet")
    logged = sorted(c.removeprefix("metrics.") for c in runs.columns if c.startswith("metrics."))
    if args.metric not in logged:
        if args.metric != DEFAULT_METRIC:
            raise BadInputError(f"no execution has the metric '{args.metric}'; they have: {logged}")
        print(f"compare: no execution has {args.metric} yet; newest first", file=sys.stderr)
    table = comparison(runs, args.metric).head(args.limit)
    if args.csv:
        table.to_csv(sys.stdout, index=False)
    elif args.markdown:
        print(to_markdown(table), end="")
    else:
        with pd.option_context("display.width", 200, "display.max_columns", None):
            print(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))


if __name__ == "__main__":
    process.run(main)
