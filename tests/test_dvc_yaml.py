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
