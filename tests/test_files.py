from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from pipeline.files import atomic_dir, atomic_file, atomic_files, project_root, write_json


def test_atomic_dir_replaces_target_only_on_success(tmp_path: Path) -> None:
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("good")

    with pytest.raises(RuntimeError), atomic_dir(target) as staging:
        (staging / "half.txt").write_text("half")
        raise RuntimeError("stage failed")
    assert [p.name for p in target.iterdir()] == ["old.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging left behind

    with atomic_dir(target) as staging:
        (staging / "new.txt").write_text("new")
    assert [p.name for p in target.iterdir()] == ["new.txt"]


def test_atomic_file_keeps_suffix_and_previous_content_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "model.keras"
    target.write_text("previous")
    with pytest.raises(ValueError), atomic_file(target) as staging:
        assert staging.suffix == ".keras"
        staging.write_text("partial")
        raise ValueError
    assert target.read_text() == "previous"
    write_json(tmp_path / "m.json", {"b": 1, "a": 2})
    assert (tmp_path / "m.json").read_text() == '{\n  "a": 2,\n  "b": 1\n}\n'


def test_atomic_files_replace_all_their_targets_or_none(tmp_path: Path) -> None:
    head, transfer = tmp_path / "head.keras", tmp_path / "transfer.keras"
    head.write_text("old head")
    transfer.write_text("old transfer")
    with pytest.raises(OSError), atomic_files(head, transfer) as (new_head, new_transfer):
        new_head.write_text("new head")
        raise OSError("disk full while writing the second")
    assert (head.read_text(), transfer.read_text()) == ("old head", "old transfer")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["head.keras", "transfer.keras"]

    with atomic_files(head, transfer) as (new_head, new_transfer):
        new_head.write_text("new head")
        new_transfer.write_text("new transfer")
        assert head.read_text() == "old head"  # nothing replaced before the block ends
    assert (head.read_text(), transfer.read_text()) == ("new head", "new transfer")


def test_staging_a_killed_run_left_behind_goes_and_nothing_else(tmp_path: Path) -> None:
    abandoned_dir = tmp_path / ".features.0123456789ab.tmp"  # as atomic_dir names them
    (abandoned_dir / "train.npz").parent.mkdir()
    (abandoned_dir / "train.npz").write_bytes(b"half written")
    abandoned_file = tmp_path / ".history.0123456789ab.tmp.csv"
    abandoned_file.write_text("half written")
    kept = [
        tmp_path / ".history.0123456789ab.tmp.png",  # another target's staging: same stem
        tmp_path / ".features.old",
        tmp_path / ".features.notahexname.tmp",
        tmp_path / "history.csv",
    ]
    for path in kept:
        path.write_text("someone else's")
    with atomic_dir(tmp_path / "features") as staging:
        (staging / "train.npz").write_bytes(b"complete")
    with atomic_file(tmp_path / "history.csv") as staging:
        staging.write_text("complete")
    names = {path.name for path in tmp_path.iterdir()}
    assert names == {"features", *(path.name for path in kept)}
    assert (tmp_path / "history.csv").read_text() == "complete"


def test_atomic_files_of_one_stem_do_not_remove_each_others_staging(tmp_path: Path) -> None:
    csv, png = tmp_path / "history.csv", tmp_path / "history.png"
    with atomic_files(csv, png) as (staged_csv, staged_png):
        staged_csv.write_text("rows")
        staged_png.write_bytes(b"figure")
    assert (csv.read_text(), png.read_bytes()) == ("rows", b"figure")


def test_outputs_get_the_permissions_of_any_new_file_not_owner_only(tmp_path: Path) -> None:
    previous_umask = os.umask(0o022)
    try:
        write_json(tmp_path / "m.json", {})
        with atomic_dir(tmp_path / "out") as staging:
            (staging / "a.txt").write_text("a")
    finally:
        os.umask(previous_umask)
    assert stat.S_IMODE((tmp_path / "m.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o755


def test_project_root_sees_through_dvc_temporary_experiment_copies(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    inside = repo / ".dvc" / "tmp" / "exps" / "tmpabc123"
    inside.mkdir(parents=True)
    assert project_root(inside) == repo.resolve()
    assert project_root(repo) == repo.resolve()


def test_project_root_from_a_subfolder_is_the_folder_with_dvc_yaml(tmp_path: Path) -> None:
    (tmp_path / "repo" / "reports" / "evaluate").mkdir(parents=True)
    (tmp_path / "repo" / "dvc.yaml").write_text("stages: {}\n")
    assert project_root(tmp_path / "repo" / "reports" / "evaluate") == (tmp_path / "repo").resolve()
    assert project_root(tmp_path) == tmp_path.resolve()  # no dvc.yaml above: where it runs


def test_project_root_follows_dvc_root_when_dvc_runs_the_stage(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path / "user-repo"))
    assert project_root() == (tmp_path / "user-repo").resolve()


def test_a_scratch_folder_of_a_dead_process_goes_and_live_or_foreign_ones_stay(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import socket
    import subprocess
    import sys
    import tempfile

    from pipeline.files import scratch_dir

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()  # reaped: its pid names no process now
    host = socket.gethostname()
    leftovers = {
        "dead": f"cache-{host}-{ended.pid}-0123456789ab",
        "live": f"cache-{host}-{os.getppid()}-0123456789ab",
        "other-host": f"cache-elsewhere.example-{ended.pid}-0123456789ab",
        "other-prefix": f"other-{host}-{ended.pid}-0123456789ab",
    }
    for name in leftovers.values():
        (tmp_path / name).mkdir()
        (tmp_path / name / "train.data").write_bytes(b"pixels")

    with scratch_dir("cache-") as folder:
        assert folder.parent == tmp_path and folder.is_dir()
        assert folder.name.startswith(f"cache-{host}-{os.getpid()}-")
        kept = {path.name for path in tmp_path.iterdir()} - {folder.name}
    assert kept == {leftovers[k] for k in ("live", "other-host", "other-prefix")}
    assert not folder.exists()
