"""Where the training stages compute: the CPU, one GPU, or every GPU of one host.

`plan_compute` decides from the `compute` params and the devices TensorFlow sees, taken as
values so the choice is testable without the hardware. `configure` applies the plan: GPU
memory growth, the Keras dtype policy and the distribution strategy. The stages call it
first thing in `main()`, before TensorFlow initialises its devices; importing this module
does nothing.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.config import ComputeConfig
from pipeline.errors import PipelineError

if TYPE_CHECKING:
    import tensorflow as tf


class DeviceError(PipelineError, RuntimeError):
    """The `compute` params ask for something this machine cannot do."""


# What Linux's /proc/cpuinfo calls native bfloat16 arithmetic: AVX512-BF16 (Zen 4 and newer,
# Cooper Lake) and AMX (Sapphire Rapids and newer). Elsewhere TensorFlow emulates bfloat16,
# slower than float32.
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_info(cpuinfo: Path = Path("/proc/cpuinfo")) -> dict[str, str]:
    """The first processor's entries of /proc/cpuinfo (empty off Linux)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return {}
    info: dict[str, str] = {}
    for line in text.split("\n\n")[0].splitlines():
        key, _, value = line.partition(":")
        info[key.strip()] = value.strip()
    return info


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The first processor's feature flags (none off Linux)."""
    return set(cpu_info(cpuinfo).get("flags", "").split())


def cpu_has_bf16(flags: set[str] | None = None) -> bool:
    flags = cpu_flags() if flags is None else flags
    return any(flag in flags for flag in BF16_CPU_FLAGS)


@dataclass(frozen=True)
class ComputePlan:
    """What a stage runs on; logged to MLflow so runs on different machines compare."""

    device: str  # "cpu" or "gpu"
    precision: str  # the Keras dtype policy: float32, mixed_float16 or mixed_bfloat16
    devices: tuple[str, ...]  # the logical devices holding one replica each
    steps_per_execution: int = 1  # batches per compiled training call

    @property
    def replicas(self) -> int:
        return len(self.devices)

    @property
    def strategy(self) -> str:
        return "mirrored" if self.replicas > 1 else "default"

    def global_batch_size(self, per_replica: int) -> int:
        """The batch `tf.data` yields: Keras splits it evenly over the replicas."""
        return per_replica * self.replicas

    def check_enough(self, **examples: int) -> None:
        """Refuses a split with fewer examples than there are replicas to share them."""
        for split, count in examples.items():
            if count < self.replicas:
                raise DeviceError(
                    f"{count} {split} examples cannot be shared by {self.replicas} "
                    "replicas; add images, or use fewer GPUs (CUDA_VISIBLE_DEVICES)"
                )

    def params(self, per_replica_batch: int) -> dict[str, Any]:
        # `compute.device` and `compute.precision` are the requested values (often `auto`),
        # logged with the stage's other params; these say what they resolved to.
        return {
            "compute.used_device": self.device,
            "compute.used_precision": self.precision,
            "compute.strategy": self.strategy,
            "compute.replicas": self.replicas,
            "compute.global_batch_size": self.global_batch_size(per_replica_batch),
            "compute.devices": ",".join(self.devices),
            "compute.used_steps_per_execution": self.steps_per_execution,
        }


def plan_compute(
    cfg: ComputeConfig,
    gpus: Sequence[str],
    cpus: Sequence[str],
    tf_config: str | None = None,
    cpu_bf16: bool = False,
) -> ComputePlan:
    """The device, precision and replicas for `cfg` given the visible logical devices.

    `auto` takes every GPU when there is one (one replica per GPU), else the CPU. Its
    precision is the fastest the hardware computes natively: mixed float16 on a GPU (tensor
    cores run it faster than float32), mixed bfloat16 on a CPU with native bfloat16
    (`cpu_bf16`: faster for VGG16 and the scratch CNN; bench.precision), else float32.
    Float16 on a CPU is emulated and slower than float32, so it is refused there.
    `steps_per_execution` falls back to 1 on several replicas: Keras's loop of several steps
    per call fails under `MirroredStrategy` ("You must feed a value for placeholder tensor
    'while/cond/Placeholder'", keras-team/keras#19246, open as of Keras 3.15).
    """
    if cfg.device == "gpu" and not gpus:
        raise DeviceError(
            "compute.device is gpu, but TensorFlow sees no GPU. Check `nvidia-smi`, that "
            "tensorflow[and-cuda] is installed (the Dockerfile's image has it) and "
            "CUDA_VISIBLE_DEVICES; or set compute.device to auto or cpu."
        )
    device = "gpu" if gpus and cfg.device != "cpu" else "cpu"
    names = tuple(gpus if device == "gpu" else cpus)
    if not names:
        raise DeviceError(f"TensorFlow lists no {device.upper()} device")
    precision = cfg.precision
    if precision == "auto":
        if device == "gpu":
            precision = "mixed_float16"
        else:
            precision = "mixed_bfloat16" if cpu_bf16 else "float32"
    elif precision == "mixed_float16" and device == "cpu":
        raise DeviceError(
            "compute.precision mixed_float16 needs a GPU: CPUs emulate float16 and run it "
            "slower than float32. Use auto, float32 or mixed_bfloat16 on a CPU."
        )
    check_single_host(tf_config)
    steps_per_execution = cfg.steps_per_execution if len(names) == 1 else 1
    return ComputePlan(device, precision, names, steps_per_execution)


def check_single_host(tf_config: str | None) -> None:
    """Refuses a `TF_CONFIG` that describes a cluster of several processes.

    Several GPUs of one host are one process, which logs and saves once. Several hosts would
    need `MultiWorkerMirroredStrategy`, which the stages do not use: each process would
    train a model of its own and write the same outputs, so that is refused, not half done.
    """
    if not tf_config:
        return
    try:
        spec = json.loads(tf_config)
    except json.JSONDecodeError as error:
        raise DeviceError(f"TF_CONFIG is not valid JSON: {error}") from None
    cluster = spec.get("cluster") or {}
    tasks = sum(len(addresses) for addresses in cluster.values())
    if tasks > 1:
        raise DeviceError(
            f"TF_CONFIG describes a cluster of {tasks} processes; the pipeline trains on one "
            "host (every GPU of it, through MirroredStrategy). Unset TF_CONFIG and run the "
            "stages on one machine."
        )


def configure(
    cfg: ComputeConfig, cpu_bfloat16_pays: bool = True
) -> tuple[ComputePlan, tf.distribute.Strategy]:
    """Applies `cfg` to this process; returns the plan and the strategy to build models in.

    Device settings only take before TensorFlow initialises its devices, so this runs before
    any other TensorFlow call. Build and compile models inside `strategy.scope()`.
    `cpu_bfloat16_pays=False` keeps `auto` at float32 on a CPU with native bfloat16: the
    scratch CNN trains faster in bfloat16, but the dense head, bound by memory, gains
    nothing (bench.precision), so it keeps float32's extra precision for free.
    """
    import keras
    import tensorflow as tf

    physical_gpus = tf.config.list_physical_devices("GPU")
    try:
        if cfg.device == "cpu":
            tf.config.set_visible_devices([], "GPU")
        else:
            for gpu in physical_gpus:
                # Take GPU memory as needed rather than all of it at start, so a second
                # process (evaluation, a notebook) can share the card.
                tf.config.experimental.set_memory_growth(gpu, True)
    except RuntimeError:
        pass  # devices already initialised by an earlier call in this process: they stay
    gpus = [device.name for device in tf.config.list_logical_devices("GPU")]
    cpus = [device.name for device in tf.config.list_logical_devices("CPU")]
    if cfg.device == "cpu":
        gpus = []
    cpu_bf16 = cpu_bfloat16_pays and cpu_has_bf16()
    plan = plan_compute(cfg, gpus, cpus, os.environ.get("TF_CONFIG"), cpu_bf16)
    keras.mixed_precision.set_global_policy(plan.precision)
    if plan.replicas > 1:
        return plan, mirrored_strategy(plan.devices)
    return plan, tf.distribute.get_strategy()


@functools.cache
def mirrored_strategy(devices: tuple[str, ...]) -> tf.distribute.Strategy:
    """One MirroredStrategy per set of devices and process.

    A second strategy over the same devices reuses the first one's collective-op keys and
    its first all-reduce fails with a shape mismatch (seen when one process runs two stages).
    """
    import tensorflow as tf

    return tf.distribute.MirroredStrategy(list(devices))
