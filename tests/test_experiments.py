"""`dvc exp show` and the diffs on a fresh clone: a committed baseline run, then an experiment."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import pytest

from devtools.fakes import write_kaggle_tree
from devtools.pipeline_copy import PipelineCopy
from tests.conftest import zip_tree

pytestmark = pytest.mark.slow


def test_a_committed_baseline_run_gives_the_diffs_and_a_short_exp_show(tmp_path) -> None:
    write_kaggle_tree(tmp_path / "src", per_class=16)
    archive = zip_tree(tmp_path / "src", tmp_path / "dogs-vs-cats.zip")
    copy = PipelineCopy.create(tmp_path / "repo", archive, {"finetune": {"enabled": False}})
    copy.dvc("repro")
    # The README's baseline step: the first run's lock file committed; the reports it names
    # are outputs in DVC's cache, read from there by the diffs.
    copy.git("add", "dvc.lock")
    copy.git("commit", "-qm", "Baseline run")
    copy.dvc("exp", "run", "-S", "head.learning_rate=0.001")

    assert "head.learning_rate" in copy.dvc("params", "diff")
    assert "transfer/test/accuracy" in copy.dvc("metrics", "diff", "--all")
    shown = copy.dvc("exp", "show", "--only-changed", "--csv", "--no-pager")
    header = next(csv.reader(io.StringIO(shown)))
    columns = [c.rpartition(":")[2] for c in header]  # reports/evaluate/metrics.json:name
    print("dvc exp show --only-changed:", columns)
    # Model quality and the param that changed; no data counts, ids, dtype or flags.
    # A score shows where it changed: on these tiny images the accuracy may well not.
    assert "head.learning_rate" in columns, header
    assert any(c.startswith("transfer/test/") for c in columns), header
    # Besides the outputs whose hashes changed (models/head.keras, ...), only scores and params.
    figures = [c for c in columns if not Path(c).suffix]
    assert not [c for c in figures if "mlflow" in c or "images" in c or "dtype" in c], header
    assert len(columns) <= 25, header
