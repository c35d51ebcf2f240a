"""A loopback HTTP server serving one file, with Range support and scriptable faults."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Served:
    payload: bytes
    support_ranges: bool = True
    cut_after: int | None = None  # close the connection after this many bytes, once
    status: int = 200
    stall_seconds: float = 0  # wait this long before answering, as a hung server would
    requests: list[dict[str, str]] = field(default_factory=list)


def make_handler(served: Served) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # keep test output quiet
            pass

        def do_GET(self) -> None:
            served.requests.append(dict(self.headers))
            if served.stall_seconds:
                time.sleep(served.stall_seconds)
                return
            if served.status != 200:
                self.send_error(served.status)
                return
            start = 0
            range_header = self.headers.get("Range")
            if range_header and served.support_ranges:
                start = int(range_header.removeprefix("bytes=").split("-")[0])
                if start >= len(served.payload):
                    self.send_response(416)
                    self.end_headers()
                    return
                self.send_response(206)
                self.send_header(
                    "Content-Range",
                    f"bytes {start}-{len(served.payload) - 1}/{len(served.payload)}",
                )
            else:
                self.send_response(200)
            body = served.payload[start:]
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if served.cut_after is not None:
                self.wfile.write(body[: served.cut_after])
                served.cut_after = None
                self.wfile.flush()
                self.connection.shutdown(2)
                return
            self.wfile.write(body)

    return Handler


@contextmanager
def serve(served: Served) -> Iterator[str]:
    """Yields the URL of `served` on 127.0.0.1; the server stops when the block ends."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(served))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/kagglecatsanddogs_5340.zip"
    finally:
        server.shutdown()
        server.server_close()
