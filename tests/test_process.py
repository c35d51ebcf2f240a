from __future__ import annotations

import gc

import pytest

from pipeline import process


@pytest.fixture
def unfrozen():
    yield
    gc.unfreeze()


def test_run_calls_main_then_freezes_what_is_left(unfrozen) -> None:
    calls = []
    before = gc.get_freeze_count()
    process.run(lambda: calls.append("main"))
    assert calls == ["main"]
    assert gc.get_freeze_count() > before


def test_a_failing_main_propagates_its_exit(unfrozen) -> None:
    def failing() -> None:
        raise SystemExit("stage: a clear reason")

    before = gc.get_freeze_count()
    with pytest.raises(SystemExit, match="a clear reason"):
        process.run(failing)
    assert gc.get_freeze_count() == before
