"""Unattended operation the README's way, for end-to-end tests: `make server`, `make deploy` and `make worker` on a
free port with their own PREFECT_HOME, and the tools to drive them (kill a process tree, wait, read events)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import psutil

from tests.helpers.prefect_server import REPO_ROOT, start

HEARTBEAT_SECONDS = 30  # Prefect's minimum
# More than one heartbeat interval: a live run always sends its next heartbeat within 30 s, however long it takes
# (a CI run once took more than 20 s over a night, and a shorter window had it marked Crashed while it worked).
# A real deployment keeps the default of three heartbeats (180 s).
ZOMBIE_SECONDS = 45


def nightly_env(home: Path, incoming: Path, store: Path, model: str, night_seconds: int, notify_url: str,
                zombie_seconds: int = ZOMBIE_SECONDS, timezone: str = "Europe/Berlin") -> dict[str, str]:
    """The environment of every make target: the nightly cron compressed to every ``night_seconds`` (a 6-field
    cron, seconds last), heartbeats as often as Prefect allows, notifications POSTed to ``notify_url``."""
    env = dict(os.environ, PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               MESS_AI_INCOMING=str(incoming), MESS_AI_STORE=str(store), MESS_AI_MODEL=model,
               MESS_AI_TIMEZONE=timezone, MESS_AI_CODE_DIR=str(REPO_ROOT),
               MESS_AI_NIGHTLY_CRON=f"* * * * * */{night_seconds}",
               MESS_AI_HEARTBEAT_SECONDS=str(HEARTBEAT_SECONDS), MESS_AI_ZOMBIE_SECONDS=str(zombie_seconds),
               MESS_AI_NOTIFY_URL=notify_url, PREFECT_WORKER_QUERY_SECONDS="2")
    env.pop("PREFECT_API_URL", None)  # the Makefile points every target at HOST:PORT itself
    return env


def make(target: str, env: dict[str, str], port: int, timeout: float = 300) -> str:
    proc = subprocess.run(["make", "--no-print-directory", target, f"PORT={port}"], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"make {target} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def start_make(target: str, env: dict[str, str], port: int, log: Path) -> subprocess.Popen:
    """A long-lived make target (``server``, ``worker``) in the background, in a session of its own."""
    return start(["make", "--no-print-directory", target, f"PORT={port}"], env, log)


def _signal_tree(process: subprocess.Popen, signum: int) -> list[psutil.Process]:
    """Send ``signum`` to a process and everything under it at once; returns them."""
    root = psutil.Process(process.pid)
    members = [root, *root.children(recursive=True)]
    for member in members:
        try:
            member.send_signal(signum)
        except psutil.NoSuchProcess:
            pass
    return members


def kill_tree(process: subprocess.Popen) -> list[int]:
    """SIGKILL a process and everything under it at once, as when its machine dies."""
    victims = _signal_tree(process, signal.SIGKILL)
    process.wait()
    return [v.pid for v in victims]


def stop_tree(process: subprocess.Popen, timeout: float = 60) -> None:
    """SIGTERM a process and everything under it, and wait until all of them have exited (``make`` exits at once
    on SIGTERM; the server it started may take seconds more, still answering meanwhile)."""
    members = _signal_tree(process, signal.SIGTERM)
    _, alive = psutil.wait_procs(members, timeout=timeout)
    for member in alive:
        member.send_signal(signal.SIGKILL)
    process.wait()


def wait_until(predicate, timeout: float, what: str, poll: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def events(api_url: str, resource_id: str, prefix: str) -> list[dict]:
    body = json.dumps({"filter": {"any_resource": {"id": [resource_id]}, "event": {"prefix": [prefix]}},
                       "limit": 50}).encode()
    request = urllib.request.Request(f"{api_url}/events/filter", data=body,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)["events"]
