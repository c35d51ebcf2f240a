"""Device choice, precision and multi-replica training, on CPUs only.

Several GPUs are stood in for by two logical CPU devices: TensorFlow accepts that setting
only before it initialises, so that test trains in a child process of its own.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import yaml
from mlflow.tracking import MlflowClient

from devtools.fakes import jpeg_bytes, photo
from pipeline.cnn import build_cnn
from pipeline.config import ComputeConfig, flatten
from pipeline.devices import DeviceError, cpu_flags, cpu_has_bf16, plan_compute
from pipeline.tracking import DEFAULT_EXPERIMENT
from tests.conftest import REPO_ROOT, dtype_policies, tiny_config

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


def test_steps_per_execution_falls_back_to_one_on_several_replicas() -> None:
    asked = ComputeConfig(steps_per_execution=16)
    assert plan_compute(asked, [], CPU).steps_per_execution == 16
    assert plan_compute(asked, ["/device:GPU:0"], CPU).steps_per_execution == 16
    on_two = plan_compute(asked, TWO_GPUS, CPU)
    assert on_two.steps_per_execution == 1
    assert on_two.params(32)["compute.used_steps_per_execution"] == 1


def test_auto_takes_mixed_bfloat16_on_a_cpu_that_computes_it_natively() -> None:
    assert plan_compute(ComputeConfig(), [], CPU, cpu_bf16=True).precision == "mixed_bfloat16"
    on_gpus = plan_compute(ComputeConfig(), TWO_GPUS, CPU, cpu_bf16=True)
    assert on_gpus.precision == "mixed_float16"
    asked = plan_compute(ComputeConfig(precision="float32"), [], CPU, cpu_bf16=True)
    assert asked.precision == "float32"


def test_native_bfloat16_is_read_from_the_cpu_flags(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(
        "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu avx512f avx512_bf16\n\n"
        "processor\t: 1\nflags\t\t: fpu avx512f avx512_bf16\n"
    )
    assert cpu_flags(cpuinfo) == {"fpu", "avx512f", "avx512_bf16"}
    assert cpu_has_bf16(cpu_flags(cpuinfo))
    assert cpu_has_bf16({"amx_tile", "amx_bf16"})
    assert not cpu_has_bf16({"avx512f", "avx512_vnni"})  # the Xeon of earlier CI runs
    assert cpu_flags(tmp_path / "missing") == set()  # not Linux: no bfloat16 assumed


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
    "tf_config",
    [None, "", json.dumps({"cluster": {"worker": ["a:1"]}, "task": {"type": "worker"}})],
)
def test_one_process_needs_no_cluster(tf_config) -> None:
    plan = plan_compute(ComputeConfig(), TWO_GPUS, CPU, tf_config)
    assert plan.replicas == 2


@pytest.mark.parametrize(
    "cluster",
    [{"worker": ["a:1", "b:1"]}, {"chief": ["a:1"], "worker": ["b:1"]}],
)
def test_a_cluster_of_several_processes_is_refused(cluster) -> None:
    # Each process would train a model of its own and write the same outputs.
    tf_config = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": 0}})
    with pytest.raises(DeviceError, match=r"cluster of 2 processes.*Unset TF_CONFIG"):
        plan_compute(ComputeConfig(), TWO_GPUS, CPU, tf_config)


def test_a_malformed_tf_config_is_named() -> None:
    with pytest.raises(DeviceError, match="TF_CONFIG is not valid JSON"):
        plan_compute(ComputeConfig(), [], CPU, "{worker")


def test_a_split_smaller_than_the_replica_count_is_refused() -> None:
    plan = plan_compute(ComputeConfig(), TWO_GPUS, CPU)
    plan.check_enough(training=9, validation=2)
    with pytest.raises(DeviceError, match=r"^1 validation examples .* 2 replicas"):
        plan.check_enough(training=9, validation=1)


def test_importing_devices_does_not_load_tensorflow() -> None:
    code = "import sys, pipeline.devices; sys.exit('tensorflow' in sys.modules)"
    subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, check=True, timeout=60)


def test_mixed_precision_keeps_the_probability_in_float32() -> None:
    cfg = tiny_config().train_cnn.model_copy(
        update={"block_filters": [4], "dense_units": [4], "batch_norm": True}
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


# Runs in a fresh interpreter: two logical CPUs, then the training stages' main() in turn,
# as DVC runs them.
TWO_REPLICAS = """
import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import mlflow.keras.save

# MLflow infers a model's pip requirements by loading it in yet another interpreter (10 s or
# more); that is beside the point here.
mlflow.keras.save.infer_pip_requirements = lambda path, flavor, fallback=None: fallback
from pipeline import devices, extract_features, finetune, train_cnn, train_head

# As on a CPU with AVX512-BF16, whatever this one has: `auto` then means mixed_bfloat16.
devices.cpu_has_bf16 = lambda flags=None: True

for stage in (train_cnn, extract_features, train_head, finetune):
    stage.main()
print("logical CPUs:", len(tf.config.list_logical_devices("CPU")))
"""

# Images per class in each split: 9 training and 9 validation images in global batches of 8
# leave a last batch of 1, which two replicas cannot share; the test split is that 1 image.
UNEVEN_SPLITS = {"train": (5, 4), "validation": (5, 4), "test": (1, 0)}


def tiny_workspace(root: Path, splits: dict[str, tuple[int, int]] = UNEVEN_SPLITS) -> Path:
    """params.yaml for one-epoch models at batch size 4 per replica, the repository's
    dvc.yaml, and a split of `splits`."""
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    one_epoch = {"batch_size": 4, "epochs": 1}
    params["train_cnn"].update(
        one_epoch,
        warmup_epochs=0,
        image_size=[32, 32],
        block_filters=[4, 4],
        dense_units=[8],
        use_augmented=False,
    )
    params["features"].update(weights="none", image_size=[32, 32], batch_size=4)
    params["head"].update(one_epoch, units=8)
    params["finetune"].update(one_epoch, enabled=True, use_augmented=False)
    params["compute"]["steps_per_execution"] = 16  # asked for; several replicas take 1
    root.mkdir(parents=True)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    shutil.copy(REPO_ROOT / "dvc.yaml", root / "dvc.yaml")
    for number, (split, counts) in enumerate(splits.items()):
        for label, (name, count) in enumerate(zip(("cats", "dogs"), counts, strict=True)):
            folder = root / "data" / "split" / split / name
            folder.mkdir(parents=True)
            for n in range(count):
                seed = 1000 * label + n + 100 * number
                (folder / f"{n}.jpg").write_bytes(jpeg_bytes(photo(label, seed, (32, 32))))
    return root


def run_in_child(script: str, *args: str, cwd: Path | None = None) -> str:
    """Runs `script` with `args` in a fresh interpreter, CPU only, without the caller's
    MLflow, DVC or TensorFlow settings; returns its stdout."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_", "TF_"))}
    env.update(PYTHONPATH=str(REPO_ROOT), TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    result = subprocess.run(
        [sys.executable, "-c", script, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def test_the_training_stages_run_on_two_replicas_and_save_and_log_once(tmp_path: Path):
    workspace = tiny_workspace(tmp_path / "workspace")
    stdout = run_in_child(TWO_REPLICAS, cwd=workspace)
    assert "logical CPUs: 2" in stdout

    for stage in ("train_cnn", "train_head", "finetune"):
        metrics = json.loads((workspace / f"reports/{stage}/metrics.json").read_text())
        assert metrics["epochs_run"] == 1 and np.isfinite(metrics["train/loss"]), stage
    # Every image has its features, the padding used for the last batch none.
    for split, counts in UNEVEN_SPLITS.items():
        with np.load(workspace / f"data/features/{split}.npz") as features:
            assert features["features"].shape[0] == sum(counts)
    # One file per model: no copy per replica, no staging file left behind.
    models = ["backbone.keras", "cnn.keras", "finetuned.keras", "head.keras", "transfer.keras"]
    assert sorted(p.name for p in (workspace / "models").iterdir()) == models
    # Trained in bfloat16 or not, each is saved to compute in float32 wherever it is loaded.
    for model in models:
        assert dtype_policies(keras.models.load_model(workspace / "models" / model)) == {"float32"}

    client = MlflowClient(f"sqlite:///{workspace / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(DEFAULT_EXPERIMENT)
    for stage in ("train_cnn", "extract_features", "train_head", "finetune"):
        runs = client.search_runs([experiment.experiment_id], f"tags.`pipeline.stage` = '{stage}'")
        assert len(runs) == 1, stage
        params = runs[0].data.params
        assert params["compute.strategy"] == "mirrored" and params["compute.replicas"] == "2"
        assert params["compute.global_batch_size"] == "8", stage
        assert params["compute.used_device"] == "cpu" and params["compute.device"] == "auto"
        # Asked for 16; one per call is what Keras can run under MirroredStrategy.
        assert params["compute.steps_per_execution"] == "16", stage
        assert params["compute.used_steps_per_execution"] == "1", stage
        # The head gains nothing from bfloat16 on a CPU; the convolutional stages twice.
        expected = "float32" if stage == "train_head" else "mixed_bfloat16"
        assert params["compute.used_precision"] == expected, stage
    logged = client.search_logged_models(experiment_ids=[experiment.experiment_id])
    assert sorted(model.name for model in logged) == ["cnn", "finetuned", "transfer"]


# 21 images in global batches of 16 on four replicas: a last batch of 5, split 2, 2, 1, 0.
FOUR_REPLICAS = """
import sys
from pathlib import Path

import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 4)
import keras

from pipeline.datasets import image_dataset
from pipeline.images import LabeledImage

strategy = tf.distribute.MirroredStrategy([d.name for d in tf.config.list_logical_devices("CPU")])
with strategy.scope():
    model = keras.Sequential([
        keras.Input((32, 32, 3)), keras.layers.Conv2D(4, 3), keras.layers.MaxPooling2D(),
        keras.layers.Flatten(), keras.layers.Dense(1, activation="sigmoid"),
    ])
    model.compile("adam", "binary_crossentropy")
images = [LabeledImage(Path(p), i % 2) for i, p in enumerate(sorted(sys.argv[1:]))]
data = image_dataset(images, (32, 32), 16, shuffle_seed=0, replicas=4)
model.fit(data, validation_data=data, epochs=1, verbose=0)
print("batches:", [len(y) for _, y in data.as_numpy_iterator()])
"""


def test_a_last_batch_split_unevenly_over_four_replicas_trains(tmp_path: Path) -> None:
    paths = []
    for n in range(21):
        paths.append(tmp_path / f"{n}.jpg")
        paths[-1].write_bytes(jpeg_bytes(photo(n % 2, n, (32, 32))))
    stdout = run_in_child(FOUR_REPLICAS, *map(str, paths))
    assert "batches: [16, 4]" in stdout  # one image of 21 left out


def test_a_stage_started_as_one_worker_of_a_cluster_exits_and_writes_nothing(tmp_path, monkeypatch):
    from pipeline import train_cnn

    workspace = tiny_workspace(tmp_path / "worker")
    cluster = {"cluster": {"worker": ["a:1", "b:1"]}, "task": {"type": "worker", "index": 1}}
    monkeypatch.setenv("TF_CONFIG", json.dumps(cluster))
    monkeypatch.chdir(workspace)
    with pytest.raises(DeviceError, match="cluster of 2 processes"):
        train_cnn.main()
    assert sorted(p.name for p in workspace.iterdir()) == ["data", "dvc.yaml", "params.yaml"]
