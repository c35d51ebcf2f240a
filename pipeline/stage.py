"""What every stage does around its work, written once.

`context(name)` loads and validates `params.yaml`, opens the stage's MLflow run under the
execution's parent with the params `dvc.yaml` declares for the stage, and plans the devices
when the stage computes on them; once `main()` has written them, it logs the stage's report
folder to the run (`reports/` among its artifacts). A `PipelineError` raised inside ends the run
FAILED with the error's line as its `error` tag and goes on to `process.run`, which prints
that line and exits 1; its atomic writes leave no half-written output, and under DVC
`dvc checkout <stage>` restores the last committed ones (DVC removed them before it ran).
A stage's `main()` is then its inputs, its core and its outputs:

    def main() -> None:
        with stage.context("augment") as ctx:
            images = list_split(ctx.cfg.paths.split / "train")  # inputs
            ...                                                 # core
            mlflow.log_metrics(...)                             # outputs
        print(...)                                              # after the run has ended
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from pipeline.config import PARAMS_FILE, Config, ConfigError, flatten, load_config
from pipeline.errors import PipelineError

if TYPE_CHECKING:
    import tensorflow as tf
    from mlflow.entities import Run

    from pipeline.devices import ComputePlan

DVC_FILE = Path("dvc.yaml")
ERROR_TAG = "error"
REPORTS_ARTIFACTS = "reports"  # where each run keeps its stage's report folder
# MLflow refuses longer tag values on some stores.
TAG_LIMIT = 5000


@dataclass(frozen=True)
class Stage:
    name: str
    cfg: Config
    run: Run | None = None  # None for a stage that is off and logs nothing
    plan: ComputePlan | None = None  # for a stage that computes on devices
    strategy: tf.distribute.Strategy | None = None  # build and compile models in its scope

    @property
    def reports(self) -> Path | None:
        """The stage's report folder (`paths.reports.<name>`), one DVC output, which the
        context logs whole to the stage's run once `main()` has written it."""
        return getattr(self.cfg.paths.reports, self.name, None)


def declared_params(stage: str, cfg: Config, dvc_file: Path = DVC_FILE) -> dict[str, Any]:
    """The params `dvc.yaml` lists for `stage`, flattened, with their validated values: what
    DVC re-runs the stage for is what its MLflow run logs, named once.

    `dvc.yaml` is read as YAML rather than through `dvc.api.params_show`, which imports DVC
    and resolves the whole pipeline for names this stage alone needs.
    """
    try:
        stages = yaml.safe_load(dvc_file.read_text(encoding="utf-8"))["stages"]
    except FileNotFoundError:
        raise ConfigError(f"{dvc_file} not found: run from the repository root") from None
    if stage not in stages:
        raise ConfigError(f"{dvc_file} has no stage {stage}")
    names: list[str] = []
    for entry in stages[stage].get("params", []):
        if isinstance(entry, str):
            names.append(entry)
        else:  # `- params.yaml: [a.b, c]`, DVC's long form
            names += entry.get(str(PARAMS_FILE), [])
    flat = flatten(cfg)
    params = {}
    for name in names:
        found = {k: v for k, v in flat.items() if k == name or k.startswith(f"{name}.")}
        if not found:
            raise ConfigError(f"{dvc_file} gives {stage} the param {name}, which is not one")
        params.update(found)
    return params


@contextlib.contextmanager
def context(
    name: str,
    *,
    batch_size: Callable[[Config], int] | None = None,
    cpu_bfloat16_pays: bool = True,
    tracked: bool | Callable[[Config], bool] = True,
) -> Iterator[Stage]:
    """Stage `name`'s config, devices and MLflow run, for its `main()` to work in.

    `batch_size` (the stage's per-replica batch, from the config) marks a stage that
    computes on the devices `compute` asks for: they are set up first, before any other
    TensorFlow call and before the run opens, so a machine that cannot run the stage (a
    worker of a cluster) writes nothing; what they resolved to is logged with the params,
    and their use (CPU, memory, GPUs) as system metrics.
    `cpu_bfloat16_pays`: see `devices.configure`. `tracked` (or a function of the config
    saying it) opens the run: a stage that is off opens none and imports neither MLflow nor
    TensorFlow, which would be most of its time.
    """
    cfg = load_config()
    if not (tracked(cfg) if callable(tracked) else tracked):
        yield Stage(name, cfg)
        return
    plan = strategy = None
    if batch_size is not None:
        from pipeline import devices

        plan, strategy = devices.configure(cfg.compute, cpu_bfloat16_pays)
    params = declared_params(name, cfg)
    if plan is not None and batch_size is not None:
        params.update(plan.params(batch_size(cfg)))
    from pipeline import tracking

    with tracking.stage_run(name, cfg, params, system_metrics=plan is not None) as run:
        try:
            yield (done := Stage(name, cfg, run, plan, strategy))
        except PipelineError as error:
            tag_failure(str(error))
            raise
        if done.reports is not None and done.reports.is_dir():
            import mlflow

            mlflow.log_artifacts(str(done.reports), artifact_path=REPORTS_ARTIFACTS)


def tag_failure(message: str) -> None:
    """The cause on the failed run, where MLflow's run list shows it; a store that went away
    (the usual cause then) leaves the run as it is and the error keeps its own line."""
    import mlflow
    from mlflow.exceptions import MlflowException

    with contextlib.suppress(MlflowException):
        mlflow.set_tag(ERROR_TAG, message[:TAG_LIMIT])
