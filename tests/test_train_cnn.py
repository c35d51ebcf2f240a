"""train_cnn as DVC runs it, its output piped to a log: what it prints there."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from devtools.pipeline_copy import TINY_PARAMS
from tests.conftest import REPO_ROOT, write_split_folder

NOISE = {
    "TensorFlow's C++ log lines": re.compile(r"^[IWEF]\d{4} ", re.MULTILINE),
    "the CUDA probe": re.compile("cuInit"),
    "absl's banner": re.compile("absl::InitializeLog"),
    "a partly read cache": re.compile("did not fully read the dataset being cached"),
    "ANSI escape codes": re.compile("\x1b\\["),
}


def test_a_stage_piped_to_a_log_prints_plain_lines_and_no_tensorflow_noise(tmp_path: Path):
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    for section, values in TINY_PARAMS.items():
        params[section].update(values)
    params["compute"]["device"] = "cpu"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    shutil.copy(REPO_ROOT / "dvc.yaml", tmp_path / "dvc.yaml")  # names the params to log
    for split, count in (("train", 8), ("validation", 4)):
        write_split_folder(tmp_path / "data" / "split" / split, count)
    # As a user's shell would have it: none of the settings the test suite sets for itself.
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("MLFLOW_", "DVC_", "TF_CPP_")) and k != "CUDA_VISIBLE_DEVICES"
    }
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.train_cnn"],
        cwd=tmp_path,
        env={**env, "PYTHONPATH": str(REPO_ROOT)},
        capture_output=True,  # piped: not a terminal
        text=True,
        timeout=600,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    found = {what: pattern.findall(output) for what, pattern in NOISE.items()}
    assert not any(found.values()), {what: hits for what, hits in found.items() if hits}
    assert re.search(r"^train_cnn: 2 epochs on 16 images, best epoch \d", result.stdout, re.M)
    assert re.search(r"^Epoch 2/2$", result.stdout, re.M)  # Keras's plain per-epoch lines
    # Batch norm's statistics, recomputed over the training images before each validation
    # (all 16 here, fewer than train_cnn.batch_norm_recompute_images).
    assert "batch norm's statistics recomputed on 16 images each epoch" in result.stdout
