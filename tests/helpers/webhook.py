"""A webhook receiver on loopback: what the notification automations POST, as the tests read it."""

from __future__ import annotations

import json
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterator


class Received:
    """The JSON bodies POSTed so far, with their arrival times (monotonic)."""

    def __init__(self) -> None:
        self.messages: list[dict] = []
        self.times: list[float] = []
        self._lock = threading.Lock()

    def add(self, message: dict) -> None:
        with self._lock:
            self.messages.append(message)
            self.times.append(time.monotonic())

    def snapshot(self) -> list[dict]:
        with self._lock:
            return list(self.messages)

    def wait_for(self, predicate, timeout: float) -> list[dict]:
        """Wait until some message satisfies ``predicate``; returns all messages that do (empty on time-out)."""
        deadline = time.monotonic() + timeout
        while True:
            matching = [m for m in self.snapshot() if predicate(m)]
            if matching or time.monotonic() > deadline:
                return matching
            time.sleep(0.5)


@contextmanager
def webhook_receiver() -> Iterator[tuple[str, Received]]:
    """Yields the URL to POST to and what was received there."""
    received = Received()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            try:
                received.add(json.loads(body))
            except ValueError:
                received.add({"unparsed": body.decode(errors="replace")})
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/hook", received
    finally:
        server.shutdown()
        server.server_close()
