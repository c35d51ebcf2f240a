"""Smoke runs of every benchmark with --quick on tiny generated images.

They check that each command runs end to end and writes a complete result (keys present,
measured numbers positive), never the figures themselves: those depend on the machine.
"""

from __future__ import annotations

import json
import numbers
from pathlib import Path
from typing import Any

import pytest

from bench import (
    accuracy,
    disk,
    feature_extraction,
    incremental,
    input_pipeline,
    memory,
    precision,
    training_step,
)
from bench.common import (
    add_workdir_argument,
    base_parser,
    dvc_stages,
    write_synthetic_images,
)
from bench.memory import fastest_run, fit_line
from tests.conftest import zip_tree

COMMON_KEYS = {"benchmark", "command", "quick", "machine", "settings", "results", "targets"}
MACHINE_KEYS = {"cpu_model", "usable_cpus", "cpu_flags", "bf16_native", "amx", "tensorflow"}


@pytest.fixture(scope="module")
def tiny_zip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bench-images")
    write_synthetic_images(root / "src", 24, size=48)
    return zip_tree(root / "src", root / "train.zip")


def load_result(json_path: Path, name: str) -> dict[str, Any]:
    assert json_path == json_path.parent / f"{name}.json"
    assert (json_path.parent / f"{name}.md").read_text().startswith("## ")
    data = json.loads(json_path.read_text())
    assert set(data) >= COMMON_KEYS
    assert data["benchmark"] == name and data["quick"] is True
    assert set(data["machine"]) >= MACHINE_KEYS
    assert {"avx512_bf16", "amx_bf16"} <= set(data["machine"]["cpu_flags"])
    return data


def assert_positive(*values: Any) -> None:
    for value in values:
        assert isinstance(value, numbers.Real) and not isinstance(value, bool), value
        assert value > 0, value


def test_input_pipeline_reports_both_approaches(tiny_zip: Path, tmp_path: Path) -> None:
    args = ["--quick", "--images", str(tiny_zip), "--out", str(tmp_path)]
    data = load_result(input_pipeline.main(args), "input_pipeline")
    rates = data["results"]["images_per_s"]
    expected = {
        "ours_cached",
        "ours_augmented",
        "tutorial_augmented",
        "ours_plain",
        "tutorial_plain",
    }
    assert expected <= set(rates)
    assert_positive(*rates.values(), data["results"]["ratio_as_trained"])
    labels = list(data["targets"])
    assert labels[0].startswith("as trained, not like for like: ")
    assert labels[1].startswith("like for like, both augmenting every epoch: ")
    assert data["targets"][labels[1]]["measured"] == data["results"]["ratio_augmented"]


def test_training_step_reports_throughput_and_share_of_peak(tiny_zip: Path, tmp_path: Path) -> None:
    args = ["--quick", "--no-xla", "--images", str(tiny_zip), "--out", str(tmp_path)]
    results = load_result(training_step.main(args), "training_step")["results"]
    assert_positive(
        results["peak_gflops"],
        results["configured_images_per_s"],
        results["configured_conv_share_of_peak"],
        results["forward_images_per_s"],
        results["training_flops_per_image"]["conv"],
    )
    for variant in results["variants"].values():
        assert_positive(variant["images_per_s"], variant["ratio_to_configured"])
    assert results["head_feature_size"] == 512  # VGG16 at the quick 32x32: 1x1x512
    one_step_per_call = results["head_steps_per_execution"] != 1
    assert set(results["head_steps"]) == {
        training_step.CONFIGURED_HEAD,
        *([training_step.ONE_STEP_PER_CALL] if one_step_per_call else []),
    }
    assert (results["head_one_step_per_call_over_configured"] is not None) == one_step_per_call
    assert_positive(*(step["ms_per_step"] for step in results["head_steps"].values()))


def test_feature_extraction_reports_real_and_plain_paths(tiny_zip: Path, tmp_path: Path) -> None:
    # Forcing bfloat16 runs that code path too, emulated where the CPU lacks it.
    args = ["--quick", "--bf16", "force", "--images", str(tiny_zip), "--out", str(tmp_path)]
    results = load_result(feature_extraction.main(args), "feature_extraction")["results"]
    assert_positive(
        results["float32_real_images_per_s"],
        results["float32_plain_images_per_s"],
        results["float32_plain_over_real"],
        results["peak"]["gflops"],
    )
    for policy in ("float32", "mixed_bfloat16"):
        assert_positive(*results["policies"][policy]["images_per_s"].values())
        assert 0 <= results["policies"][policy]["head_val_accuracy"] <= 1
    difference = results["bf16_minus_float32_head_accuracy"]
    assert difference == pytest.approx(
        results["policies"]["mixed_bfloat16"]["head_val_accuracy"]
        - results["policies"]["float32"]["head_val_accuracy"]
    )


def test_fit_line_finds_slope_intercept_and_fit() -> None:
    fit = fit_line([1000, 4000, 16000], [12.0, 18.0, 42.0])
    assert fit is not None
    assert fit["slope"] == pytest.approx(0.002) and fit["intercept"] == pytest.approx(10.0)
    assert fit["r2"] == pytest.approx(1.0) and fit["max_relative_miss"] == pytest.approx(0.0)
    assert fit_line([1, 2], [1.0, 2.0]) is None  # two points always fit a line


@pytest.mark.slow
def test_incremental_and_disk_run_dvc_on_a_copy(tiny_zip: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    workdir = tmp_path / "not/yet"  # --workdir is created when missing
    args = ["--quick", "--images", str(tiny_zip), "--out", str(out), "--workdir", str(workdir)]
    data = load_result(incremental.main([*args, "--keep"]), "incremental")
    steps = data["results"]["steps"]
    assert next(iter(steps)) == "from scratch" and len(steps) == 4
    assert steps["from scratch"]["stages_run"][0] == "download"
    assert steps["nothing changed"]["stages_run"] == []
    assert_positive(
        *(step["seconds"] for step in steps.values()), *data["results"]["overheads"].values()
    )
    assert data["results"]["augment_reran_after_train_cnn_edit"] is False
    head_edit, cnn_edit = list(steps.values())[2:]
    assert head_edit["stages_run"] == ["train_head", "finetune", "evaluate"]
    assert "train_cnn" in cnn_edit["stages_run"] and "augment" not in cnn_edit["stages_run"]

    # The kept copy has run the whole pipeline: disk measures it without a second repro.
    repo = data["results"]["kept_copy"]
    args = ["--quick", "--images", str(tiny_zip), "--out", str(out), "--repo", repo]
    results = load_result(disk.main([*args, "--repeats", "1"]), "disk")["results"]
    (state,) = results["states"].values()
    assert_positive(
        results["archive_bytes"],
        results["dvc_status_s"],
        results["total_on_disk_to_archive"],
        state["usage"]["data/split"]["apparent"],
        state["usage"][".dvc/cache"]["files"],
    )


@pytest.mark.slow
def test_memory_reports_each_stage(tmp_path: Path) -> None:
    args = ["--quick", "--sizes", "12", "--out", str(tmp_path), "--workdir", str(tmp_path)]
    args += ["--repeats", "2"]
    results = load_result(memory.main(args), "memory")["results"]
    assert list(results["stages"]) == list(dvc_stages())
    for stage, measured in results["stages"].items():
        assert len(measured["all_seconds"]["12"]) == (2 if stage in memory.WATCHED else 1)
    for stage in results["stages"].values():
        assert_positive(*stage["peak_rss_mib"].values(), *stage["seconds"].values())
    assert_positive(results["import_floor"]["train_cnn"]["peak_rss_mib"])
    # The head fed both ways, on the configured split of 12 (0.1 each for validation and
    # test): 10 training and 1 validation vectors, of the quick feature length.
    assert set(results["head_feeding"]) == set(memory.HEAD_FEEDINGS)
    for runs in results["head_feeding"].values():
        (run,) = runs.values()
        assert (run["train"], run["validation"], run["returncode"]) == (10, 1, 0)
        assert_positive(run["peak_rss_mib"], run["seconds"])
    assert_positive(*results["head_feeding_peak_rows_over_indices"].values())


@pytest.mark.slow
def test_precision_runs_the_stages_under_both_policies(tiny_zip: Path, tmp_path: Path) -> None:
    # --force: measured even where the CPU would emulate bfloat16.
    args = ["--quick", "--force", "--images", str(tiny_zip), "--out", str(tmp_path)]
    results = load_result(precision.main(args), "precision")["results"]
    assert set(results["runs"]) == {
        "train_cnn, float32",
        "train_cnn, mixed_bfloat16",
        "extract_features, float32",
        "extract_features, mixed_bfloat16",
        "train_head, float32, on float32 features",
        "train_head, float32, on mixed_bfloat16 features",
        "train_head, mixed_bfloat16, on mixed_bfloat16 features",
    }
    for name, runs in results["runs"].items():
        (run,) = runs  # one seed
        assert_positive(run["seconds"])
        if not name.startswith("extract_features"):
            assert 0 <= run["val_accuracy"] <= 1 and run["val_loss"] > 0, name
    assert_positive(*results["speedups"].values())


def test_precision_measures_nothing_on_a_cpu_without_native_bfloat16(monkeypatch, tmp_path) -> None:
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda flags=None: False)
    data = load_result(precision.main(["--quick", "--out", str(tmp_path)]), "precision")
    assert data["results"] == {} and "neither AVX512-BF16 nor AMX" in data["notes"][0]


def test_the_fastest_run_counts_and_the_highest_peak() -> None:
    runs = [
        {"seconds": 9.0, "cpu_seconds": 12.0, "peak_rss_mib": 900.0, "returncode": 0},
        {"seconds": 7.0, "cpu_seconds": 10.0, "peak_rss_mib": 880.0, "returncode": 0},
        {"seconds": 8.0, "cpu_seconds": 11.0, "peak_rss_mib": 950.0, "returncode": 0},
    ]
    assert fastest_run(runs) == {
        "seconds": 7.0,
        "cpu_seconds": 10.0,
        "peak_rss_mib": 950.0,
        "returncode": 0,
        "all_seconds": [9.0, 7.0, 8.0],
    }


def test_disk_resizes_the_images_into_a_kaggle_layout_zip(tiny_zip: Path, tmp_path: Path) -> None:
    import zipfile

    from PIL import Image

    resized = disk.resized_archive(tiny_zip, "40x30", tmp_path)
    with zipfile.ZipFile(tiny_zip) as original, zipfile.ZipFile(resized) as archive:
        names = archive.namelist()
        assert len(names) == len([n for n in original.namelist() if not n.endswith("/")])
        assert {name.split("/")[1].split(".")[0] for name in names} == {"cat", "dog"}
        with Image.open(archive.open(names[0])) as image:
            assert image.size == (40, 30) and image.format == "JPEG"
    assert disk.image_count(resized) == len(names)


def test_disk_refuses_a_resize_it_cannot_read(tiny_zip: Path, tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        disk.main(["--quick", "--images", str(tiny_zip), "--resize", "40by30"])


def test_copies_make_distinct_files_of_both_classes(tiny_zip: Path, tmp_path: Path) -> None:
    import zipfile

    archive = incremental.copied_archive(tiny_zip, 3, tmp_path)
    with zipfile.ZipFile(archive) as opened:
        names = opened.namelist()
        contents = {opened.read(name) for name in names}
    assert len(names) == len(set(names)) == 3 * 24
    assert len(contents) == len(names)  # mirrored and shifted copies differ from the originals
    assert sum(name.startswith("train/cat.") for name in names) == 3 * 12
    assert all(name.startswith(("train/cat.", "train/dog.")) for name in names)


def test_workdir_is_created_when_missing_and_refused_under_a_file(tmp_path: Path, capsys) -> None:
    parser = base_parser("test", images=False)
    add_workdir_argument(parser)
    nested = tmp_path / "a/b"
    assert parser.parse_args(["--workdir", str(nested)]).workdir == nested and nested.is_dir()
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit):
        parser.parse_args(["--workdir", str(tmp_path / "file/sub")])
    assert "cannot create" in capsys.readouterr().err


def test_incremental_edits_the_head_then_the_cnn_unless_told_not_to() -> None:
    params = {"head": {"learning_rate": 0.0001}, "train_cnn": {"dropout": 0.4}}
    edits = incremental.planned_edits(params)
    assert list(edits.values()) == [
        None,
        None,
        ("head", "learning_rate", pytest.approx(0.001)),
        ("train_cnn", "dropout", 0.3),  # a real change, whatever the configured dropout
    ]
    assert list(incremental.planned_edits(params, cnn_edit=False)) == list(edits)[:3]


@pytest.mark.slow
def test_accuracy_reports_a_presets_test_accuracy_with_its_interval_and_without_tta(
    tiny_zip: Path, tmp_path: Path
) -> None:
    args = ["--quick", "--preset", "tutorial", "--seed", "0", "--images", str(tiny_zip)]
    data = load_result(accuracy.main([*args, "--out", str(tmp_path)]), "accuracy-tutorial-all-0")
    assert "train_cnn.optimizer=sgd" in data["settings"]["overrides"]
    assert data["command"].startswith("python -m bench.accuracy ")
    results = data["results"]
    cnn = results["cnn"]
    assert cnn["accuracy_ci_low"] <= cnn["accuracy"] <= cnn["accuracy_ci_high"]
    assert 0 <= results["cnn_without_tta"]["accuracy"] <= 1
    assert results["train_cnn"]["epochs_run"] >= 1
    assert_positive(results["wall_s"], results["stage_seconds"]["train_cnn"])


@pytest.mark.slow
def test_accuracy_cnn_only_trains_no_vgg16_stage_and_scores_through_predict(
    tiny_zip: Path, tmp_path: Path
) -> None:
    args = ["--quick", "--cnn-only", "--images", str(tiny_zip), "--out", str(tmp_path)]
    data = load_result(accuracy.main(args), "accuracy-default-all")
    results = data["results"]
    assert "train_cnn" in results["stage_seconds"]
    assert "extract_features" not in results["stage_seconds"]
    assert results["transfer_random_vgg16"] is None
    for view in ("cnn", "cnn_without_tta"):
        scores = results[view]
        assert scores["accuracy_ci_low"] <= scores["accuracy"] <= scores["accuracy_ci_high"]
        assert scores["log_loss"] >= 0
    assert results["cnn"]["accuracy"] != results["cnn_without_tta"]["accuracy"] or (
        results["cnn"]["log_loss"] != results["cnn_without_tta"]["log_loss"]
    )  # the mirrored view changed the probabilities


def test_plot_accuracy_draws_the_committed_results_and_names_missing_columns(
    tmp_path: Path,
) -> None:
    from bench import plot_accuracy

    committed = plot_accuracy.read_results(plot_accuracy.REPO_ROOT / "bench" / "accuracy.csv")
    assert (committed["ci_low"] <= committed["test_accuracy"]).all()
    assert (committed["test_accuracy"] <= committed["ci_high"]).all()
    assert committed["command"].str.match(r"(make pipeline|python -m bench\.accuracy) ").all()
    out = plot_accuracy.main(["--out", str(tmp_path / "accuracy.png")])
    assert out.read_bytes().startswith(b"\x89PNG")
    broken = tmp_path / "broken.csv"
    broken.write_text("recipe,test_accuracy\ndefault,0.9\n")
    with pytest.raises(SystemExit, match="lacks the columns"):
        plot_accuracy.main(["--csv", str(broken), "--out", str(tmp_path / "x.png")])


def imported_top_packages(folder: str) -> dict[str, set[str]]:
    """For each `.py` file under `folder`, the top-level packages it imports, at any depth."""
    import ast

    from tests.conftest import REPO_ROOT

    found = {}
    for path in sorted((REPO_ROOT / folder).rglob("*.py")):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names.add(node.module.split(".")[0])
            elif isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
        found[path.relative_to(REPO_ROOT).as_posix()] = names
    return found


def test_benchmarks_share_the_tests_fakes_through_devtools_never_tests() -> None:
    """tests/ may change with any test; what the benchmarks need lives in devtools/."""
    for folder, forbidden in [
        ("bench", {"tests"}),
        ("devtools", {"tests", "bench"}),
        ("pipeline", {"tests", "bench", "devtools"}),  # what ships imports no dev code
    ]:
        for path, imported in imported_top_packages(folder).items():
            assert not imported & forbidden, f"{path} imports {sorted(imported & forbidden)}"
