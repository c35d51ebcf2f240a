"""How each `python -m pipeline.<module>` runs: its `main()`, then a quick exit; whether a
run that left something behind is still running; the argument types the CLIs share."""

from __future__ import annotations

import argparse
import contextlib
import gc
import glob
import importlib.abc
import importlib.util
import os
import re
import socket
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NoReturn

from pipeline.errors import PipelineError

# The shell's convention for a process ended by SIGINT (128 + 2): `make` and DVC stop too.
INTERRUPTED = 130


def run(main: Callable[[], None]) -> None:
    """Runs `main`, then keeps Python's garbage collector off what is left at exit.

    A process that imported TensorFlow, Keras and MLflow holds millions of objects, and the
    collections Python runs while shutting down take seconds of each such stage's wall time
    (`bench.incremental` measures them) to free memory the OS frees anyway. Frozen objects
    are skipped by those collections; atexit handlers, `with` blocks and reference counting
    still run, so files, temporary folders and MLflow runs are closed as before.

    A `PipelineError` ends it with its one line after the program's name (`split: ...`) and
    exit status 1, Ctrl-C with `name: interrupted` and 130, instead of a traceback; the
    `with` blocks they pass through have already dropped half-written outputs and closed
    the run.
    """
    try:
        main()
    except KeyboardInterrupt:
        fail(main, "interrupted", INTERRUPTED)
    except PipelineError as error:
        fail(main, str(error), 1)
    gc.freeze()


def fail(main: Callable[[], None], message: str, status: int) -> NoReturn:
    code = getattr(main, "__code__", None)
    name = Path(code.co_filename if code else sys.argv[0]).stem
    print(f"{name}: {message}", file=sys.stderr)
    sys.exit(status)


def quiet_tensorflow_logs() -> None:
    """TensorFlow's C++ start-up lines (oneDNN, CPU features, CUDA stubs) left out, and on a
    machine without an NVIDIA GPU also its CUDA probe, which it logs as an error (`failed
    call to cuInit`) though nothing is wrong; with a GPU its warnings and errors stay.

    A `TF_CPP_MIN_LOG_LEVEL` the user set is kept, and then nothing is filtered:
    `TF_CPP_MIN_LOG_LEVEL=0` shows every line.
    """
    if "TF_CPP_MIN_LOG_LEVEL" in os.environ:
        return
    hidden = os.environ.get("CUDA_VISIBLE_DEVICES") in ("", "-1")
    level = 1 if glob.glob("/dev/nvidia[0-9]*") and not hidden else 3
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = str(level)
    if "tensorflow" not in sys.modules:
        sys.meta_path.insert(0, _QuietTensorFlowImport(level))


# A C++ log line: its severity letter (Info, Warning, Error, Fatal), then the date.
LOG_LINE = re.compile(r"^([IWEF])\d{4} ")
SEVERITIES = "IWEF"


class _QuietTensorFlowImport(importlib.abc.MetaPathFinder):
    """Imports TensorFlow with its C++ lines below `level` filtered out of stderr.

    The lines its libraries log as they load come before TensorFlow reads
    TF_CPP_MIN_LOG_LEVEL (absl logs everything until it is initialised, and says so), so the
    variable alone cannot hide them; stderr is caught while the import runs and written back
    without them.
    """

    def __init__(self, level: int) -> None:
        self.level = level

    def find_spec(self, name, path=None, target=None):
        if name != "tensorflow":
            return None
        sys.meta_path.remove(self)  # once, and not for the lookup below
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            loader, level = spec.loader, self.level

            class Loader(importlib.abc.Loader):
                def create_module(self, spec):
                    return loader.create_module(spec)

                def exec_module(self, module):
                    module.__loader__ = module.__spec__.loader = loader
                    with _stderr_without_log_lines_below(level):
                        loader.exec_module(module)

            spec.loader = Loader()
        return spec


@contextlib.contextmanager
def _stderr_without_log_lines_below(level: int) -> Iterator[None]:
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as caught:
        os.dup2(caught.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            caught.seek(0)
            for line in caught.read().decode(errors="replace").splitlines(keepends=True):
                severity = LOG_LINE.match(line)
                if "absl::InitializeLog()" in line:
                    continue
                if severity and SEVERITIES.index(severity[1]) < level:
                    continue
                sys.stderr.write(line)
            sys.stderr.flush()


def this_host() -> str:
    return socket.gethostname()


def has_ended(host: str, pid: int) -> bool:
    """Whether process `pid` of `host` has certainly ended. A process on another host, or
    another user's, cannot be checked from here and counts as running: what it left stays.
    (A reused pid also counts as running: its leftovers wait for a later run.)"""
    if host != this_host() or pid <= 0:  # os.kill(0, ...) would signal our own group
        return False
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return True
    except PermissionError:  # exists, another user's
        return False
    return False


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive whole number")
    return value


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """`--help` with the description's examples kept as written and each option's default
    shown, except the defaults that mean "not given" (None, False), which say nothing."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)
