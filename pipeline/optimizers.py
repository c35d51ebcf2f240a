"""The optimizers, learning-rate schedules and compile settings every training stage uses."""

from __future__ import annotations

import keras

from pipeline.config import OptimizerMixin, TrainCnnConfig


def make_optimizer(
    cfg: OptimizerMixin, learning_rate: float | keras.optimizers.schedules.LearningRateSchedule = 0
) -> keras.optimizers.Optimizer:
    """The optimizer `cfg` names, at `learning_rate` (a schedule) or else `cfg.learning_rate`."""
    rate = learning_rate or cfg.learning_rate
    if cfg.optimizer == "sgd":
        return keras.optimizers.SGD(learning_rate=rate, momentum=cfg.momentum)
    if cfg.optimizer == "rmsprop":
        return keras.optimizers.RMSprop(learning_rate=rate, momentum=cfg.momentum)
    if cfg.optimizer == "adamw":
        optimizer = keras.optimizers.AdamW(learning_rate=rate, weight_decay=cfg.weight_decay)
        # Decay shrinks weights toward zero; biases and batch-norm scales and offsets have no
        # such prior, so they are left alone, as in the AdamW paper's experiments.
        optimizer.exclude_from_weight_decay(var_names=["bias", "gamma", "beta"])
        return optimizer
    return keras.optimizers.Adam(learning_rate=rate)


def compile_binary(
    model: keras.Model,
    cfg: OptimizerMixin,
    optimizer: keras.optimizers.Optimizer | None = None,
    jit_compile: bool | str = "auto",
    steps_per_execution: int = 1,
    label_smoothing: float = 0.0,
) -> keras.Model:
    """Compiles `model` as every stage trains it; `optimizer` and `jit_compile` let the
    benchmarks measure alternatives to `make_optimizer(cfg)` and Keras's default.

    `steps_per_execution` batches run inside one compiled call: the same updates in the same
    order (`compute.steps_per_execution` in params.yaml), with one Python round trip each.
    """
    model.compile(
        optimizer=optimizer or make_optimizer(cfg),
        loss=keras.losses.BinaryCrossentropy(label_smoothing=label_smoothing),
        metrics=["accuracy", keras.metrics.AUC(name="auc")],
        jit_compile=jit_compile,
        steps_per_execution=steps_per_execution,
    )
    return model


def learning_rate_schedule(
    cfg: TrainCnnConfig, steps_per_epoch: int
) -> float | keras.optimizers.schedules.LearningRateSchedule:
    """`cfg.learning_rate`, constant or reached after `warmup_epochs` of linear warm-up and
    then decayed to zero along a cosine by the last epoch (Keras's `CosineDecay`)."""
    if cfg.schedule == "constant":
        return cfg.learning_rate
    warmup_steps = cfg.warmup_epochs * steps_per_epoch
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0 if warmup_steps else cfg.learning_rate,
        decay_steps=(cfg.epochs - cfg.warmup_epochs) * steps_per_epoch,
        warmup_target=cfg.learning_rate if warmup_steps else None,
        warmup_steps=warmup_steps,
    )
