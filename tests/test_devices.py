"""Device choice, precision and multi-replica training, on CPUs only.

Several GPUs are stood in for by two logical CPU devices: TensorFlow accepts that setting
only before it initialises, so that test trains in a child process of its own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import yaml
from mlflow.tracking import MlflowClient

from pipeline.config import ComputeConfig, flatten
from pipeline.devices import DeviceError, is_chief, plan_compute
from pipeline.models import build_cnn
from pipeline.tracking import DEFAULT_EXPERIMENT
from tests.conftest import REPO_ROOT, jpeg_bytes, photo, tiny_config

CPU = ["/device:CPU:0"]
TWO_GPUS = ["/device:GPU:0", "/device:GPU:1"]


def test_auto_uses_every_gpu_with_mixed_float16_and_a_global_batch() -> None:
    plan = plan_compute(ComputeConfig(), TWO_GPUS, CPU)
    assert (plan.device, plan.precision, plan.strategy) == ("gpu", "mixed_float16", "mirrored")
    assert plan.replicas == 2 and plan.global_batch_size(32) == 64
    assert plan.params(32)["compute.devices"] == "/device:GPU:0,/device:GPU:1"


def test_auto_without_a_gpu_is_one_cpu_replica_in_float32() -> None:
    plan = plan_compute(ComputeConfig(), [], CPU)
    assert (plan.device, plan.precision, plan.strategy) == ("cpu", "float32", "default")
    assert plan.global_batch_size(32) == 32


def test_cpu_can_be_forced_on_a_gpu_machine_and_asks_for_bfloat16_explicitly() -> None:
    plan = plan_compute(ComputeConfig(device="cpu"), TWO_GPUS, CPU)
    assert (plan.device, plan.devices, plan.precision) == ("cpu", tuple(CPU), "float32")
    bf16 = plan_compute(ComputeConfig(device="cpu", precision="mixed_bfloat16"), [], CPU)
    assert bf16.precision == "mixed_bfloat16"
    assert plan_compute(ComputeConfig(precision="float32"), TWO_GPUS, CPU).precision == "float32"


def test_gpu_without_a_gpu_and_float16_on_a_cpu_are_refused_with_a_fix() -> None:
    with pytest.raises(DeviceError, match=r"sees no GPU.*nvidia-smi"):
        plan_compute(ComputeConfig(device="gpu"), [], CPU)
    with pytest.raises(DeviceError, match="mixed_float16 needs a GPU"):
        plan_compute(ComputeConfig(precision="mixed_float16"), [], CPU)


def test_resolved_values_do_not_reuse_the_requested_param_names() -> None:
    # MLflow refuses to log a param twice with different values: `compute.device: auto` is
    # logged from params.yaml, so what it resolved to needs names of its own.
    requested = flatten({"compute": ComputeConfig().model_dump(mode="json")})
    assert set(plan_compute(ComputeConfig(), [], CPU).params(8)).isdisjoint(requested)


@pytest.mark.parametrize(
    ("tf_config", "chief"),
    [
        (None, True),
        ("", True),
        ({"cluster": {"worker": ["a:1", "b:1"]}, "task": {"type": "worker", "index": 0}}, True),
        ({"cluster": {"worker": ["a:1", "b:1"]}, "task": {"type": "worker", "index": 1}}, False),
        ({"cluster": {"chief": ["a:1"], "worker": ["b:1"]}, "task": {"type": "chief"}}, True),
        (
            {"cluster": {"chief": ["a:1"], "worker": ["b:1"]}, "task": {"type": "worker"}},
            False,
        ),
        ({"cluster": {"evaluator": ["c:1"]}, "task": {"type": "evaluator", "index": 0}}, False),
    ],
)
def test_only_the_chief_of_a_cluster_logs_and_saves(tf_config, chief: bool) -> None:
    text = json.dumps(tf_config) if isinstance(tf_config, dict) else tf_config
    assert is_chief(text) is chief


def test_a_malformed_tf_config_is_named() -> None:
    with pytest.raises(DeviceError, match="TF_CONFIG is not valid JSON"):
        is_chief("{worker")


def test_importing_devices_does_not_load_tensorflow() -> None:
    code = "import sys, pipeline.devices; sys.exit('tensorflow' in sys.modules)"
    subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, check=True, timeout=60)


def test_mixed_precision_keeps_the_probability_in_float32() -> None:
    cfg = tiny_config().train_cnn.model_copy(
        update={"conv_filters": [4], "dense_units": [4], "batch_norm": True}
    )
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = build_cnn(cfg)
        images = np.random.default_rng(0).uniform(0, 255, (4, 32, 32, 3)).astype("float32")
        loss = model.train_on_batch(images, np.array([0, 1, 0, 1], "float32"))[0]
    finally:
        keras.mixed_precision.set_global_policy("float32")
    conv = next(layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D))
    assert conv.compute_dtype == "float16" and conv.kernel.dtype == "float32"
    assert model.get_layer("prob_dog").compute_dtype == "float32"
    assert model.output.dtype == "float32"
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    assert np.isfinite(loss)


# Runs in a fresh interpreter: two logical CPUs, then train_cnn's main() as DVC runs it.
TWO_REPLICAS = """
import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import mlflow.keras.save

# MLflow infers a model's pip requirements by loading it in yet another interpreter (10 s or
# more); that is beside the point here.
mlflow.keras.save.infer_pip_requirements = lambda path, flavor, fallback=None: fallback
from pipeline import train_cnn

train_cnn.main()
print("logical CPUs:", len(tf.config.list_logical_devices("CPU")))
"""


def tiny_workspace(root: Path, per_class: int = 4) -> Path:
    """params.yaml for a one-step CNN, and a split of `per_class` training images per class."""
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    tiny = {"image_size": [32, 32], "conv_filters": [4, 4], "dense_units": [8], "epochs": 1}
    params["train_cnn"].update(tiny, batch_size=per_class, use_augmented=False)
    root.mkdir(parents=True)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for split, count in (("train", per_class), ("validation", per_class // 2)):
        for label, name in enumerate(("cats", "dogs")):
            folder = root / "data" / "split" / split / name
            folder.mkdir(parents=True)
            for n in range(count):
                seed = 1000 * label + n + (500 if split == "validation" else 0)
                (folder / f"{n}.jpg").write_bytes(jpeg_bytes(photo(label, seed, (32, 32))))
    return root


def test_scratch_cnn_trains_on_two_replicas_and_is_saved_and_logged_once(tmp_path: Path):
    workspace = tiny_workspace(tmp_path / "workspace")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_", "TF_"))}
    env.update(PYTHONPATH=str(REPO_ROOT), TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    result = subprocess.run(
        [sys.executable, "-c", TWO_REPLICAS],
        cwd=workspace,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "logical CPUs: 2" in result.stdout

    metrics = json.loads((workspace / "reports/train_cnn/metrics.json").read_text())
    assert metrics["epochs_run"] == 1 and np.isfinite(metrics["best_loss"])
    # One model file: no copy per replica, no staging file left behind.
    assert sorted(p.name for p in (workspace / "models").iterdir()) == ["cnn.keras"]

    client = MlflowClient(f"sqlite:///{workspace / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(DEFAULT_EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id], "tags.`pipeline.stage` = 'train_cnn'")
    assert len(runs) == 1
    params = runs[0].data.params
    assert params["compute.strategy"] == "mirrored" and params["compute.replicas"] == "2"
    assert params["compute.global_batch_size"] == "8" and params["train_cnn.batch_size"] == "4"
    assert params["compute.used_device"] == "cpu" and params["compute.device"] == "auto"
    logged = client.search_logged_models(experiment_ids=[experiment.experiment_id])
    assert [model.name for model in logged] == ["cnn"]


def test_a_worker_that_is_not_the_chief_trains_but_writes_nothing(tmp_path, monkeypatch):
    from pipeline import train_cnn

    workspace = tiny_workspace(tmp_path / "worker")
    cluster = {"cluster": {"worker": ["a:1", "b:1"]}, "task": {"type": "worker", "index": 1}}
    monkeypatch.setenv("TF_CONFIG", json.dumps(cluster))
    monkeypatch.chdir(workspace)
    fits, real_fit = [], train_cnn.fit
    monkeypatch.setattr(train_cnn, "fit", lambda *a, **kw: fits.append(kw) or real_fit(*a, **kw))
    train_cnn.main()
    assert fits == [{"log_to_mlflow": False}]
    assert sorted(p.name for p in workspace.iterdir()) == ["data", "params.yaml"]
