"""A real `prefect server start` on a free loopback port, with SQLite in a temporary folder (for end-to-end tests)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

REPO_ROOT = Path(__file__).resolve().parents[2]
PREFECT = str(Path(sys.executable).parent / "prefect")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(api_url: str, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{api_url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"the Prefect server at {api_url} did not become healthy in {timeout:.0f} s")


def start(command: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """A background process in a session of its own, so it and its children can be stopped together."""
    return subprocess.Popen(command, env=env, cwd=REPO_ROOT, stdout=open(log, "wb"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


# As `make server` starts it (its SERVER_ENV; tests/test_deployments.py checks the two agree).
SERVER_SETTINGS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": "prefect.server.concurrency.lease_storage.filesystem",
    "PREFECT_SERVER_CONCURRENCY_MAXIMUM_CONCURRENCY_SLOT_WAIT_SECONDS": "5",
}


def make_server_start_lines() -> list[str] | None:
    """The `prefect server start` command lines `make server` would run with the Makefile's defaults (``make -n``,
    HOST and PORT unset); None when make is not installed."""
    if not shutil.which("make"):
        return None
    dry = subprocess.run(["make", "-n", "server"], cwd=REPO_ROOT, capture_output=True, text=True,
                         env={k: v for k, v in os.environ.items() if k not in ("HOST", "PORT")})
    return [line for line in dry.stdout.splitlines() if "server start" in line]


@contextmanager
def prefect_server(home: Path) -> Iterator[tuple[str, dict[str, str]]]:
    """Yields the API URL and an environment pointing at it."""
    port = free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    home.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PREFECT_HOME=str(home), PREFECT_API_URL=api_url,
               PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="180", **SERVER_SETTINGS)
    server = start([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)], env,
                   home / "server.log")
    try:
        wait_healthy(api_url)
        yield api_url, env
    finally:
        stop(server)
