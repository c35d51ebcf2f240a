"""A real `mlflow server` on 127.0.0.1 with a SQLite backend and a local artifact store."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pipeline.team_stack import free_port


@contextmanager
def mlflow_server(folder: Path, timeout: float = 240, store: str | None = None) -> Iterator[str]:
    """Starts the server, waits until it answers, yields its URL, and stops it: on `store`,
    or a new SQLite store in `folder`, where its log goes too."""
    store = store or f"sqlite:///{folder / 'mlflow.db'}"
    mlflow = [sys.executable, "-m", "mlflow"]
    subprocess.run([*mlflow, "db", "upgrade", store], check=True, capture_output=True)
    port = free_port()
    log = (folder / "server.log").open("w")
    server = subprocess.Popen(
        [
            *mlflow,
            "server",
            "--backend-store-uri",
            store,
            "--artifacts-destination",
            str(folder / "artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        # Its own process group: the server starts job workers that must stop with it.
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"mlflow server did not start:\n{(folder / 'server.log').read_text()}"
                )
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
        log.close()
