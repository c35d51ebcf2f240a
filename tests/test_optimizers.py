from __future__ import annotations

import keras
import pytest

from pipeline.optimizers import learning_rate_schedule, make_optimizer
from tests.conftest import tiny_config

CNN = tiny_config().train_cnn
HEAD = tiny_config().head.model_copy(update={"units": 8, "learning_rate": 1e-3})


def test_cosine_schedule_warms_up_linearly_then_decays_to_zero() -> None:
    cfg = CNN.model_copy(
        update={"learning_rate": 0.002, "epochs": 5, "warmup_epochs": 1, "schedule": "cosine"}
    )
    schedule = learning_rate_schedule(cfg, steps_per_epoch=10)
    rate = [float(schedule(step)) for step in (0, 5, 10, 30, 50)]
    assert rate[0] == pytest.approx(0.0)
    assert rate[1] == pytest.approx(0.001)
    assert rate[2] == pytest.approx(0.002)
    assert rate[3] == pytest.approx(0.001, rel=1e-3)  # halfway down the cosine
    assert rate[4] == pytest.approx(0.0, abs=1e-9)
    constant = CNN.model_copy(update={"schedule": "constant", "learning_rate": 0.003})
    assert learning_rate_schedule(constant, steps_per_epoch=10) == 0.003


@pytest.mark.parametrize(
    ("name", "kind", "momentum"),
    [
        ("adam", keras.optimizers.Adam, None),
        ("sgd", keras.optimizers.SGD, 0.9),
        ("rmsprop", keras.optimizers.RMSprop, 0.9),
    ],
)
def test_optimizer_is_the_configured_one_with_its_learning_rate(name, kind, momentum) -> None:
    cfg = HEAD.model_copy(update={"optimizer": name, "learning_rate": 0.05, "momentum": 0.9})
    optimizer = make_optimizer(cfg)
    assert type(optimizer) is kind
    assert float(optimizer.learning_rate) == pytest.approx(0.05)
    if momentum is not None:
        assert optimizer.momentum == pytest.approx(momentum)
