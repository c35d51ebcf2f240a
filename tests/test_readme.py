"""The README's commands, run as written: its ```bash blocks, read out of README.md so that the
two cannot drift, in a fresh copy of the repository with nothing activated.

A block the test cannot run says so in the README, on the line before it:
`<!-- readme-test: skip, <why> -->`. Every other block runs, top to bottom, in one bash
process (an `. .venv/bin/activate` in one block holds for the blocks after it, as in the
reader's terminal), with PATH=/usr/bin:/bin plus the directory of the `python3` that make
needs: no virtual environment, no PYTHONPATH.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from devtools.fakes import jpeg_bytes, photo, write_kaggle_tree
from devtools.pipeline_copy import copy_repository
from tests.conftest import zip_tree

REPO_ROOT = Path(__file__).resolve().parents[1]
README = REPO_ROOT / "README.md"
SKIP = re.compile(r"<!--\s*readme-test:\s*skip,\s*(?P<why>.+?)\s*-->")
FENCE = re.compile(r"^```bash\n(?P<body>.*?)^```$", re.DOTALL | re.MULTILINE)


@dataclass(frozen=True)
class Block:
    line: int  # of the opening fence, 1-based
    body: str
    skip: str | None  # why the test does not run it


def readme_blocks(text: str) -> list[Block]:
    """Every ```bash block, with the skip reason of the comment on the line before it."""
    blocks = []
    for match in FENCE.finditer(text):
        before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        marker = SKIP.search(before)
        line = text.count("\n", 0, match.start()) + 1
        blocks.append(Block(line, match["body"], marker["why"] if marker else None))
    return blocks


BLOCKS = readme_blocks(README.read_text())
RUN = [block for block in BLOCKS if block.skip is None]


def test_every_readme_block_runs_or_says_why_not() -> None:
    """The workflows a newcomer follows are among the blocks the slow test runs."""
    assert len(BLOCKS) == README.read_text().count("```bash")
    assert all(block.skip.strip() for block in BLOCKS if block.skip is not None)
    run = "".join(block.body for block in RUN)
    for needed in (
        "make pipeline DATA=",  # set-up and the offline run
        "dvc exp run -S ",  # a param edit
        "make compare",
        "python -m pipeline.predict",
    ):
        assert needed in run, f"no README block the test runs has `{needed}`"


def test_the_readme_lists_the_targets_make_help_prints() -> None:
    printed = subprocess.run(
        ["make", "-s", "--no-print-directory", "help"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert f"```bash\nmake help\n```\n\n```\n{printed}```\n" in README.read_text()


@pytest.mark.parametrize(
    "block",
    [block for block in BLOCKS if block.skip],
    ids=lambda block: f"README.md:{block.line}",
)
def test_readme_block_not_run_here(block: Block) -> None:
    """One skip per block the README marks, so that the test report says which and why."""
    first = block.body.strip().splitlines()[0].split("  #")[0].strip()
    pytest.skip(f"README.md line {block.line} ({first}): {block.skip}")


def script(blocks: list[Block]) -> str:
    """One bash script of the blocks, each announced, so that a failure names its block."""
    parts = ["set -euo pipefail"]
    for block in blocks:
        parts.append(f"echo '>>> README.md line {block.line}'")
        parts.append(block.body)
    return "\n".join(parts)


def fresh_copy(target: Path) -> Path:
    """The repository as a clone would have it: the files git tracks (and untracked ones it
    does not ignore, so that uncommitted work is tested too), one commit, nothing else."""
    copy_repository(target)
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com"]
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "a fresh clone"]):
        subprocess.run([*git, *args], cwd=target, check=True, capture_output=True)
    return target


def newcomer_env(home: Path) -> dict[str, str]:
    """A login shell on a fresh machine: the system's PATH and the python3 make runs, an
    empty home. Only pip's machine settings pass (a warm wheel cache, the package index)."""
    python_dir = Path(sys._base_executable).parent  # the interpreter this venv was made from
    env = {k: v for k, v in os.environ.items() if k.startswith("PIP_")}
    env.update(
        PATH=f"/usr/bin:/bin:{python_dir}",
        HOME=str(home),
        LANG="C.UTF-8",
        PIP_CACHE_DIR=os.environ.get("PIP_CACHE_DIR", str(Path.home() / ".cache" / "pip")),
        TF_CPP_MIN_LOG_LEVEL="2",
        DVC_NO_ANALYTICS="1",
    )
    return env


def the_readers_files(home: Path, repo: Path) -> None:
    """What the README's commands name as the reader's own: Kaggle's train.zip in Downloads
    (40 small JPEGs here), photos to classify, and the competition's unlabelled test1/."""
    (home / "Downloads").mkdir(parents=True)
    write_kaggle_tree(home / "kaggle", per_class=20)
    zip_tree(home / "kaggle", home / "Downloads" / "train.zip")
    (repo / "my_photos").mkdir()
    for n in range(4):
        (repo / "my_photos" / f"{n}.jpg").write_bytes(jpeg_bytes(photo(n % 2, 500 + n)))
    (repo / "rex.jpg").write_bytes(jpeg_bytes(photo(1, 600)))
    (repo / "test1").mkdir()
    for image_id in range(1, 5):
        (repo / "test1" / f"{image_id}.jpg").write_bytes(jpeg_bytes(photo(image_id % 2, 700)))


@pytest.mark.slow
def test_the_readme_runs_as_written_on_a_fresh_clone(tmp_path: Path) -> None:
    home, repo = tmp_path / "home", fresh_copy(tmp_path / "repo")
    the_readers_files(home, repo)
    started = time.monotonic()
    result = subprocess.run(
        ["bash", "-c", script(RUN)],
        cwd=repo,
        env=newcomer_env(home),
        capture_output=True,
        text=True,
        timeout=1800,
    )
    output = result.stdout + result.stderr
    announced = re.findall(r">>> README.md line \d+", result.stdout)
    where = announced[-1] if announced else "before the first block"
    assert result.returncode == 0, f"failed in the block at {where}:\n{output[-6000:]}"
    print(f"README blocks ran in {time.monotonic() - started:.0f} s")

    # What the blocks were for: models trained, a second experiment, predictions written.
    assert (repo / ".venv" / "bin" / "python").exists()
    assert (repo / "models" / "transfer.keras").exists()
    params = yaml.safe_load((repo / "params.yaml").read_text())
    assert params["download"]["source"] == "local" and params["features"]["weights"] == "none"
    assert params["head"]["learning_rate"] == 0.001  # the experiment, applied to the workspace
    assert (repo / "predictions.csv").read_text().count("\n") == 1 + 5  # header, 4 + rex.jpg
    assert (repo / "submission.csv").read_text().splitlines()[0] == "id,label"
    # 3 GB that pytest would keep with its last three temporary folders; kept on failure.
    shutil.rmtree(repo / ".venv")


def test_every_guarantee_names_a_test_that_exists() -> None:
    """The README's Guarantees list promises only what a test in the repository proves."""
    section = README.read_text().split("## Guarantees\n", 1)[1].split("\n## ", 1)[0]
    items = re.findall(r"^- .*\n  `(test_\w+\.py)::(test_\w+)`$", section, re.MULTILINE)
    assert len(items) == section.count("\n- ") >= 5
    for file, name in items:
        source = (REPO_ROOT / "tests" / file).read_text()
        assert re.search(rf"^def {name}\(", source, re.MULTILINE), f"{file}::{name}"
