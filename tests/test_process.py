from __future__ import annotations

import gc
import glob
import os
import subprocess
import sys

import pytest

from pipeline import process
from pipeline.errors import MissingInputError


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


def test_a_pipeline_error_is_one_line_after_the_programs_name_and_exit_status_1(
    unfrozen, capsys
) -> None:
    def main() -> None:
        raise MissingInputError("data/split is empty; run the split stage first")

    before = gc.get_freeze_count()
    with pytest.raises(SystemExit) as exit_info:
        process.run(main)
    assert exit_info.value.code == 1
    assert capsys.readouterr().err == (
        "test_process: data/split is empty; run the split stage first\n"
    )
    assert gc.get_freeze_count() == before


def test_any_other_exception_keeps_its_traceback(unfrozen) -> None:
    def main() -> None:
        raise ValueError("a bug")

    with pytest.raises(ValueError, match="a bug"):
        process.run(main)


HEAVY = ("tensorflow", "keras", "mlflow", "pandas")


@pytest.mark.parametrize(
    ("module", "args"),
    [
        ("pipeline.predict", ["--help"]),
        ("pipeline.compare", ["--help"]),
        ("pipeline.registry", ["--help"]),
        ("pipeline.registry", ["promote", "--help"]),
    ],
)
def test_a_cli_help_is_instant_and_explains_every_option(module: str, args: list[str]) -> None:
    """`--help` imports no TensorFlow, Keras, MLflow or pandas (seconds each), keeps the
    examples as written and gives every option a line, with its default."""
    code = (
        "import runpy, sys\n"
        f"sys.argv = ['{module}', *{args!r}]\n"
        "try:\n"
        f"    runpy.run_module('{module}', run_name='__main__')\n"
        "except SystemExit:\n"
        "    pass\n"
        f"print('imported:', sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert "imported: []" in result.stdout, result.stdout
    shown = result.stdout
    assert "usage: python -m" in shown
    lines = shown.splitlines()
    assert any(line.startswith("  -h, --help") for line in lines), shown
    undocumented = [line for line in lines if line.startswith("  --") and len(line.split()) < 3]
    # An option whose metavar fills the column has its help on the next line instead.
    for line in undocumented:
        following = lines[lines.index(line) + 1]
        assert following.startswith(" " * 10), f"{line!r} has no help"


def test_predict_help_keeps_the_examples_and_shows_defaults() -> None:
    shown = subprocess.run(
        [sys.executable, "-m", "pipeline.predict", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert (
        "    python -m pipeline.predict --model models/transfer.keras photos/ cat.jpg --out "
        "predictions.csv" in shown
    )
    words = " ".join(shown.split())  # however argparse wrapped them
    assert "(default: 0.5)" in words and "(default: 32)" in words
    assert "(default: None)" not in words and "(default: False)" not in words


def test_ctrl_c_prints_one_line_and_exits_130(unfrozen, capsys) -> None:
    def main() -> None:
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as exit_info:
        process.run(main)
    assert exit_info.value.code == 130
    assert capsys.readouterr().err == "test_process: interrupted\n"


def test_a_stage_interrupted_by_sigint_exits_without_a_traceback(tmp_path) -> None:
    import signal

    script = tmp_path / "slow_stage.py"
    script.write_text(
        "import signal, time\n"
        "from pipeline import process\n"
        # A shell that runs the suite in the background (CI, nohup) starts its children with
        # SIGINT ignored, and Python then never raises KeyboardInterrupt: a terminal does not.
        "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
        "def main():\n"
        "    print('ready', flush=True)\n"
        "    time.sleep(60)\n"
        "process.run(main)\n"
    )
    child = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert child.stdout.readline() == "ready\n"
    child.send_signal(signal.SIGINT)  # what Ctrl-C sends
    _, err = child.communicate(timeout=30)
    assert child.returncode == 130
    assert err == "slow_stage: interrupted\n"


@pytest.mark.parametrize(
    ("devices", "visible", "level"),
    [([], None, "3"), (["/dev/nvidia0"], None, "1"), (["/dev/nvidia0"], "-1", "3")],
)
def test_tensorflow_start_up_lines_and_the_cuda_probe_are_hidden_without_a_gpu(
    monkeypatch, devices, visible, level
) -> None:
    monkeypatch.delenv("TF_CPP_MIN_LOG_LEVEL", raising=False)
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    monkeypatch.setattr(process.glob, "glob", lambda pattern: devices)
    monkeypatch.setattr(sys, "meta_path", list(sys.meta_path))  # the import hook, undone
    process.quiet_tensorflow_logs()
    assert os.environ["TF_CPP_MIN_LOG_LEVEL"] == level


def test_tensorflow_imports_without_its_start_up_lines_and_keeps_other_output() -> None:
    code = (
        "import sys, pipeline, tensorflow as tf; tf.constant(1).numpy(); "
        "print('plain line', file=sys.stderr)"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TF_CPP_", "CUDA_"))}
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == ["plain line"] or glob.glob("/dev/nvidia[0-9]*")


def test_a_tensorflow_log_level_the_user_set_is_kept(monkeypatch) -> None:
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "0")
    process.quiet_tensorflow_logs()
    assert os.environ["TF_CPP_MIN_LOG_LEVEL"] == "0"
