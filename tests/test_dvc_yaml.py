"""dvc.yaml against the code: every stage depends on the modules it runs."""

from __future__ import annotations

import ast
import re

import yaml

from tests.conftest import REPO_ROOT

# Left out of every stage's deps on purpose (see dvc.yaml's header): they decide where runs
# are logged, what a stage does around its work, how its process exits with an error and how
# a logged model serves, not what a stage computes.
NOT_DEPS = {
    "pipeline/tracking.py",
    "pipeline/stage.py",
    "pipeline/errors.py",
    "pipeline/process.py",
    "pipeline/serving.py",
}


def imported_pipeline_modules(path: str, skip: frozenset[str] = frozenset(NOT_DEPS)) -> set[str]:
    """`pipeline/*.py` files `path` imports, directly or through others, at any depth of code;
    not through those in `skip`."""
    seen: set[str] = set()
    pending = [path]
    while pending:
        current = pending.pop()
        if current in seen or current in skip:
            continue
        seen.add(current)
        tree = ast.parse((REPO_ROOT / current).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names:
                module = name.replace(".", "/") + ".py"
                if name.startswith("pipeline.") and (REPO_ROOT / module).is_file():
                    pending.append(module)
    return seen - NOT_DEPS


def test_every_stage_depends_on_exactly_the_pipeline_modules_it_imports() -> None:
    """Missing, an edit would not re-run the stage; extra, an edit would re-run it for nothing."""
    stages = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]
    checked = 0
    for name, stage in stages.items():
        module = stage["cmd"].removeprefix("python -m ").replace(".", "/") + ".py"
        deps = {d for d in stage["deps"] if d.startswith("pipeline/")}
        imported = imported_pipeline_modules(module)
        assert not imported - deps, (
            f"stage {name} imports {sorted(imported - deps)} but does not depend on them"
        )
        # What the stage context imports for it (its config, its devices) counts as its own.
        reachable = imported_pipeline_modules(module, skip=frozenset()) - NOT_DEPS
        assert not deps - reachable, (
            f"stage {name} depends on {sorted(deps - reachable)} but does not import them"
        )
        checked += 1
    assert checked == len(stages) >= 9


def test_stages_are_leaves_no_stage_depends_on_another_stages_module() -> None:
    """Shared code lives in modules no stage runs, so an edit to one stage re-runs only it
    and what reads its outputs."""
    stages = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]
    modules = {
        name: stage["cmd"].removeprefix("python -m ").replace(".", "/") + ".py"
        for name, stage in stages.items()
    }
    for name, stage in stages.items():
        others = set(modules.values()) - {modules[name]}
        assert not others & set(stage["deps"]), f"{name} depends on {others & set(stage['deps'])}"
        assert not others & imported_pipeline_modules(modules[name]), f"{name} imports a stage"


def test_a_stage_that_reads_named_splits_depends_on_those_folders_only() -> None:
    """`paths.split / "test"` in a stage's module: it depends on `${paths.split}/test`, not on
    the whole split, which DVC would check file by file on every repro for nothing."""
    stages = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]
    narrowed = 0
    for name, stage in stages.items():
        module = stage["cmd"].removeprefix("python -m ").replace(".", "/") + ".py"
        source = (REPO_ROOT / module).read_text()
        named = set(re.findall(r'split(?:_root)? / "(\w+)"', source))
        deps = stage["deps"]
        folders = {
            d.removeprefix("${paths.split}/") for d in deps if d.startswith("${paths.split}/")
        }
        if named:
            assert "${paths.split}" not in deps, f"{name} reads {sorted(named)} only"
            assert folders == named, f"{name} reads {sorted(named)}, depends on {sorted(folders)}"
            narrowed += 1
        else:
            assert not folders, f"{name} depends on {sorted(folders)} but names no split"
    assert narrowed == 5  # augment, train_cnn, finetune, evaluate, explain


def resolved(path: str, params: dict) -> str:
    """`path` with its `${paths.*}` references replaced by params.yaml's values, as DVC does."""

    def value(match: re.Match) -> str:
        found = params
        for key in match[1].split("."):
            found = found[key]
        return str(found)

    return re.sub(r"\$\{([\w.]+)\}", value, path)


def declared_outputs(stage: dict) -> list[tuple[str, dict]]:
    return [
        next(iter(out.items())) if isinstance(out, dict) else (out, {})
        for out in stage.get("outs", [])
    ]


def test_every_stage_can_be_run_cached_no_output_persists_or_skips_the_cache() -> None:
    """DVC run-caches a stage only when no output is `persist` and every output but metrics
    and plots is cached: otherwise going back to params already run trains again."""
    stages = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        outs = declared_outputs(stage)
        assert outs, f"{name} declares no output"
        for path, options in outs:
            assert not options.get("persist"), f"{name}: {path} is persist"
            assert options.get("cache", True), f"{name}: {path} is cache: false"
        assert not {"metrics", "plots"} & set(stage), f"{name}: its own metrics or plots"


def test_each_stage_names_its_report_folder_once_as_one_output() -> None:
    """A stage's reports are one folder output, `${paths.reports.<stage>}`; the files in it are
    named only by the code that writes them and by the top-level metrics and plots that read
    them, each of which lies in a stage's declared report folder."""
    dvc_yaml = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    stages = dvc_yaml["stages"]
    folders = {}
    for name, stage in stages.items():
        reports = [path for path, _ in declared_outputs(stage) if "paths.reports" in path]
        if name in params["paths"]["reports"]:
            assert reports == [f"${{paths.reports.{name}}}"], f"{name} declares {reports}"
            folders[name] = resolved(reports[0], params)
        else:
            assert not reports, f"{name} writes into another stage's report folder: {reports}"
    assert set(folders) == set(params["paths"]["reports"])

    read = list(dvc_yaml["metrics"])
    for plot in dvc_yaml["plots"]:
        if isinstance(plot, str):
            read.append(plot)
        else:
            (spec,) = plot.values()
            read.extend(spec["y"])
    assert len(read) >= 10
    for path in read:
        file = resolved(path, params)
        owners = [name for name, folder in folders.items() if file.startswith(f"{folder}/")]
        assert len(owners) == 1, f"{file} is in no stage's report folder"
