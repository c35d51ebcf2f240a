"""What a user sees in MLflow's UI after two executions and a failed one, read from the page a
real headless Chromium renders (Debian's, driven by Playwright) from a real `mlflow server` on
127.0.0.1: the text on screen, not MLflow's REST API, which other tests read.

MLFLOW_UI_SCREENSHOTS=docs also saves small PNGs of the runs table, the chart comparing the
two executions and the Models tab there, as docs/pipeline.md shows them.
"""

from __future__ import annotations

import io
import os
import shutil
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest

from devtools.fakes import write_kaggle_tree
from devtools.pipeline_copy import PipelineCopy
from tests.conftest import zip_tree
from tests.mlflow_server import mlflow_server

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM, reason="no Chromium: apt-get install chromium"),
]

SCREENSHOTS = os.environ.get("MLFLOW_UI_SCREENSHOTS")
# The UI opens an experiment on its GenAI pages and its assistant panel beside them; a user of
# this pipeline clicks "Model training" and closes the panel.
RUNS = "#/experiments/{id}/runs?workflowType=machine_learning"
NO_ASSISTANT = """
localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true');
localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false');
"""
EXPAND = "[data-component-id$='runnamecellrenderer.tsx_46']"  # a parent run's +/- button


@pytest.fixture(scope="module")
def executions(tmp_path_factory: pytest.TempPathFactory) -> PipelineCopy:
    """Two DVC experiments that differ by the CNN's learning rate, and a third whose download
    fails; up to `evaluate` (explain adds nothing the UI is checked for here)."""
    data = tmp_path_factory.mktemp("dataset")
    write_kaggle_tree(data / "src", per_class=16)
    archive = zip_tree(data / "src", data / "dogs-vs-cats.zip")
    copy = PipelineCopy.create(
        tmp_path_factory.mktemp("repo"), archive, {"finetune": {"enabled": False}}
    )
    copy.dvc("exp", "run", "-n", "first", "evaluate")
    copy.dvc("exp", "run", "-n", "second", "-S", "train_cnn.learning_rate=0.004", "evaluate")
    missing = f"download.local_path={data / 'missing.zip'}"
    failed = copy.dvc("exp", "run", "-n", "broken", "-S", missing, "evaluate", check=False)
    assert "missing.zip does not exist" in failed
    return copy


@pytest.fixture(scope="module")
def server(executions: PipelineCopy, tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    """A browser, and the runs page of the executions' experiment on an MLflow server."""
    from playwright.sync_api import sync_playwright

    _, experiment = executions.mlflow()
    store = f"sqlite:///{executions.root / 'mlflow.db'}"
    with (
        mlflow_server(tmp_path_factory.mktemp("server"), store=store) as url,
        sync_playwright() as playwright,
    ):
        browser = playwright.chromium.launch(executable_path=CHROMIUM)
        yield browser, f"{url}/{RUNS.format(id=experiment.experiment_id)}"
        browser.close()


@pytest.fixture
def ui(server) -> Iterator:
    """A page of its own (the UI keeps which runs are expanded in the browser's storage)."""
    browser, runs_url = server
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    context.add_init_script(NO_ASSISTANT)
    context.set_default_timeout(60_000)
    page = context.new_page()
    page.runs_url = runs_url
    yield page
    context.close()


def save_screenshot(page, name: str, element=None) -> None:
    """A PNG of the page (or one element of it), downscaled to 900 pixels wide and reduced to
    a palette, so it stays small in git."""
    if not SCREENSHOTS:
        return
    from PIL import Image, ImageChops

    image = Image.open(io.BytesIO((element or page).screenshot()))
    if image.width > 900:
        image = image.resize((900, round(image.height * 900 / image.width)), Image.LANCZOS)
    image = image.convert("RGB")
    # Cropped below the last thing drawn (the page is taller than the table), the assistant's
    # button in the bottom right corner and the frame's edge aside.
    content = image.crop((0, 0, image.width - 90, image.height - 12))
    background = content.getpixel((content.width // 2, content.height - 1))
    blank = Image.new("RGB", content.size, background)
    bottom = ImageChops.difference(content, blank).getbbox()[3]
    image = image.crop((0, 0, image.width, min(image.height, bottom + 16))).quantize(colors=256)
    Path(SCREENSHOTS).mkdir(parents=True, exist_ok=True)
    image.save(Path(SCREENSHOTS) / name, optimize=True)


def open_runs(page, search: str = "", chart: bool = False) -> None:
    """The experiment's runs, as a table or charts, those `search` finds."""
    query = {"searchFilter": search} if search else {}
    if chart:
        query["compareRunsMode"] = "CHART"
    page.goto(f"{page.runs_url}&{urllib.parse.urlencode(query)}")
    page.get_by_text("first", exact=True).first.wait_for()


def show_children(page, *parents: str) -> None:
    """Expands the parent runs `parents` in the runs list, showing their child runs."""
    for parent in parents:
        row = page.get_by_role("row").filter(has=page.get_by_text(parent, exact=True))
        row.locator(EXPAND).click()
        page.get_by_text(f" · {parent}").first.wait_for()


def test_each_execution_is_one_parent_named_after_its_experiment_holding_its_stages(ui) -> None:
    open_runs(ui)
    for name in ("first", "second", "broken"):
        ui.get_by_text(name, exact=True).wait_for()
    show_children(ui, "first")
    for stage in ("download", "split", "augment", "train_cnn", "train_head", "evaluate"):
        ui.get_by_text(f"{stage} · first", exact=True).wait_for()
    save_screenshot(ui, "mlflow-runs.png", ui.locator("main").first)
    # A child of the second execution is not shown under the first.
    assert ui.get_by_text("train_cnn · second", exact=True).count() == 0


def parent_page_status(ui, name: str) -> str:
    """The text of the parent run `name`'s page, from its Status line down."""
    open_runs(ui)
    ui.get_by_text(name, exact=True).click()
    ui.get_by_text(f"download · {name}").wait_for()  # the child runs, loaded after the rest
    text = ui.locator("body").inner_text()
    return text[text.index("\nStatus\n") :]


def test_the_failed_execution_is_marked_failed_and_names_its_stage(ui) -> None:
    failed = parent_page_status(ui, "broken")
    assert failed.startswith("\nStatus\nFailed\n"), failed[:200]
    assert "download · broken" in failed
    assert "pipeline.failed_stage\n: download" in failed
    finished = parent_page_status(ui, "first")
    assert finished.startswith("\nStatus\nFinished\n"), finished[:200]
    assert "evaluate · first" in finished and "train_cnn · first" in finished


def test_one_chart_holds_both_executions_validation_curves_under_their_own_names(ui) -> None:
    open_runs(ui, search="attributes.run_name LIKE 'train_cnn%'", chart=True)
    show_children(ui, "first", "second")
    ui.get_by_placeholder("Search metric charts").fill("val/loss")
    # The parents' own val/loss (cnn/val/loss, ...) are bars in sections of their own.
    for section in ("cnn/val", "transfer/val"):
        ui.get_by_text(section, exact=True).click()
    curves = [ui.get_by_text(f"train_cnn · {name} (val/loss)") for name in ("first", "second")]
    for curve in curves:  # a legend entry: a line of this chart, named after its run
        curve.wait_for()
    card = ui.locator("div").filter(has=ui.get_by_text("val/loss", exact=True))
    card = card.filter(has=curves[0]).filter(has=curves[1]).last  # the innermost: one chart
    shown = card.inner_text()
    assert "Step" in shown and "transfer/val" not in shown, shown
    save_screenshot(ui, "mlflow-chart.png", ui.locator("main").first)


def test_the_evaluate_run_lists_its_figures_among_its_artifacts(ui) -> None:
    open_runs(ui)
    show_children(ui, "first")
    ui.get_by_text("evaluate · first", exact=True).click()
    ui.get_by_role("tab", name="Artifacts").click()
    ui.get_by_text("reports", exact=True).first.click()
    for figure in ("confusion_cnn.png", "roc.png", "mistakes_cnn.png"):
        ui.get_by_text(figure, exact=True).wait_for()


def test_the_models_tab_lists_each_executions_models_with_their_test_accuracy(ui) -> None:
    ui.set_viewport_size({"width": 1800, "height": 600})  # the metrics' columns on screen
    open_runs(ui)
    ui.get_by_role("link", name="Models", exact=True).click()
    for run in ("train_cnn · first", "train_cnn · second", "train_head · first"):
        ui.get_by_text(run, exact=True).wait_for()
    text = ui.locator("main").first.inner_text()
    assert "test/accuracy" in text
    save_screenshot(ui, "mlflow-models.png", ui.locator("main").first)
