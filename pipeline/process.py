"""How each `python -m pipeline.<module>` runs: its `main()`, then a quick exit; whether a
run that left something behind is still running; the argument types the CLIs share."""

from __future__ import annotations

import argparse
import gc
import os
import socket
import sys
from collections.abc import Callable
from pathlib import Path

# The shell's convention for a process ended by SIGINT (128 + 2): `make` and DVC stop too.
INTERRUPTED = 130


def run(main: Callable[[], None]) -> None:
    """Runs `main`, then keeps Python's garbage collector off what is left at exit.

    A process that imported TensorFlow, Keras and MLflow holds millions of objects, and the
    collections Python runs while shutting down take 1.5-2.5 s of each such stage's wall time
    (`bench.incremental`) to free memory the OS frees anyway. Frozen objects are skipped by
    those collections; atexit handlers, `with` blocks and reference counting still run, so
    files, temporary folders and MLflow runs are closed as before.

    Ctrl-C ends it with one line and exit status 130 instead of a traceback; the `with`
    blocks it passes through have already kept the previous outputs and closed the run.
    """
    try:
        main()
    except KeyboardInterrupt:
        code = getattr(main, "__code__", None)
        name = Path(code.co_filename if code else sys.argv[0]).stem
        print(f"{name}: interrupted", file=sys.stderr)
        sys.exit(INTERRUPTED)
    gc.freeze()


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
