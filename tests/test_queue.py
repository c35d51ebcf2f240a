"""Queued DVC experiments run two at a time, each landing in MLflow under its own name."""

from __future__ import annotations

import json
import time

import pytest

from devtools.pipeline_copy import PipelineCopy

pytestmark = pytest.mark.slow

VARIATIONS = {"q-units-8": 8, "q-units-12": 12, "q-units-24": 24, "q-units-32": 32}


def wait_for_queue(copy: PipelineCopy, timeout: float = 1200) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = copy.dvc("queue", "status")
        if not any(word in status for word in ("Running", "Queued")):
            return status
        time.sleep(5)
    raise AssertionError(f"queue still busy after {timeout} s:\n{status}")


def test_four_queued_experiments_two_at_a_time(tiny_pipeline: PipelineCopy) -> None:
    copy = tiny_pipeline
    copy.git("add", "-A")
    copy.git("commit", "-qm", "baseline with its dvc.lock")
    for name, units in VARIATIONS.items():
        copy.dvc("exp", "run", "--queue", "-n", name, "-S", f"head.units={units}")
    copy.dvc("queue", "start", "--jobs", "2")
    status = wait_for_queue(copy)
    assert status.count("Success") == 4, status

    shown = json.loads(copy.dvc("exp", "show", "--json"))
    names = {
        exp["name"]
        for baseline in shown
        for experiment in baseline.get("experiments") or []
        for exp in experiment.get("revs", [])
    }
    assert set(VARIATIONS) <= names

    client, experiment = copy.mlflow()
    parents = client.search_runs(
        [experiment.experiment_id], filter_string="tags.`pipeline.stage` = 'pipeline'"
    )
    ours = [p for p in parents if p.info.run_name in VARIATIONS]
    # Exactly one execution each: none lost, merged or split in two.
    assert sorted(p.data.tags.get("dvc.exp_name") for p in ours) == sorted(VARIATIONS)
    queued = {p.data.tags["dvc.exp_name"]: p for p in ours}
    for name, parent in queued.items():
        assert parent.info.run_name == name
        assert parent.data.params["head.units"] == str(VARIATIONS[name])
        children = client.search_runs(
            [experiment.experiment_id],
            filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
        )
        stages = sorted(c.data.tags["pipeline.stage"] for c in children)
        # Upstream outputs came from the cache; only what depends on the head ran.
        assert stages == ["evaluate", "finetune", "train_head"]
        head = next(c for c in children if c.data.tags["pipeline.stage"] == "train_head")
        assert head.data.params["head.units"] == str(VARIATIONS[name])

    listing = copy.run(copy.python, "-m", "pipeline.compare", "--csv")
    header, *rows = listing.strip().splitlines()
    assert "head.units" in header.split(",")
    assert sum(any(name in row for name in VARIATIONS) for row in rows) == 4
