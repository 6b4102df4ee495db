"""The Prefect server going away in the middle of a flow run (a real `prefect server start`, killed with SIGKILL).

What happens (measured by this test, figures in docs/reliability.md): the tasks already running finish their files;
the next call the flow makes to the API is retried by Prefect's client (PREFECT_CLIENT_MAX_RETRIES, with backoff)
and then raises ``httpx.ConnectError``, so the flow process exits with status 1 and a traceback after a few minutes.
The store must lose nothing: finished files stay done, prepared ones stay pending, no temporary file and no lock
is left, and a re-run against a server that is back completes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from mess_ai.store import DONE
from tests.helpers.audio import write_audio
from tests.helpers.prefect_server import PREFECT, REPO_ROOT, SERVER_SETTINGS, free_port, start, stop, wait_healthy
from tests.helpers.store_checks import assert_complete, assert_consistent_after_crash, rows, temp_files

pytestmark = pytest.mark.soak


def _server(home, log):
    port = free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    env = dict(os.environ, PREFECT_HOME=str(home), PREFECT_API_URL=api_url, **SERVER_SETTINGS)
    process = start([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)], env, log)
    wait_healthy(api_url)
    return process, api_url, env


def _extract(audio, store, model, env, gpu_limit):
    return subprocess.Popen(
        [sys.executable, "-m", "cli", "extract", str(audio), "--store", str(store), "--model", model,
         "--device", "cpu", "--files-per-task", "2", "--gpu-limit", gpu_limit],
        cwd=REPO_ROOT, env=dict(env, PYTHONUNBUFFERED="1"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True)


def _flow_run_states(api_url):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        return sorted(run.state.name for run in client.read_flow_runs() if run.state is not None)


@pytest.mark.parametrize("gpu_limit", ["", "gpu"])
def test_server_killed_mid_run_loses_nothing(tmp_path, tiny_model, gpu_limit, figures):
    audio, store, home = tmp_path / "audio", tmp_path / "store", tmp_path / "prefect"
    for i in range(12):
        write_audio(audio / f"track{i:02d}.wav", seconds=30.0, sample_rate=44100, seed=i)
    server, api_url, env = _server(home, tmp_path / "server-1.log")
    try:
        run = _extract(audio, store, tiny_model, env, gpu_limit)
        deadline = time.monotonic() + 300
        # The file system first: opening the manifest while the run creates it could race with it.
        while not ((store / "audio" / "segments").is_dir() and any((store / "audio" / "segments").iterdir())):
            assert run.poll() is None and time.monotonic() < deadline, run.stdout.read()[-3000:]
            time.sleep(0.1)
        while not any(r["status"] == DONE for r in rows(store, "audio").values()):
            assert run.poll() is None and time.monotonic() < deadline, run.stdout.read()[-3000:]
            time.sleep(0.1)
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()
        gone = time.monotonic()
        done_when_gone = sum(r["status"] == DONE for r in rows(store, "audio").values())
        output, _ = run.communicate(timeout=900)
        seconds_to_exit = time.monotonic() - gone
    finally:
        stop(server)
    last_line = output.strip().splitlines()[-1]
    assert run.returncode == 1 and "ConnectError" in output, output[-3000:]

    counts = assert_consistent_after_crash(store, "audio", audio)
    assert counts[DONE] >= done_when_gone and counts["failed"] == 0
    assert not temp_files(store)

    server, api_url, env = _server(home, tmp_path / "server-2.log")  # the same database, back again
    try:
        started = time.monotonic()
        rerun = _extract(audio, store, tiny_model, env, gpu_limit)
        try:
            # The files left take about a minute; a GPU slot held by a killed run frees itself within 60 s.
            rerun_output, _ = rerun.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            rerun.kill()
            rerun_output, _ = rerun.communicate()
            pytest.fail(f"the re-run did not finish in 300 s:\n{rerun_output[-3000:]}")
        rerun_seconds = time.monotonic() - started
        assert rerun.returncode == 0, rerun_output[-3000:]
        states = _flow_run_states(api_url)
    finally:
        stop(server)
    assert_complete(store, "audio", audio)
    figures({"gpu_limit": gpu_limit or "none", "done_when_server_died": done_when_gone,
             "rows_after_exit": counts, "seconds_from_server_death_to_exit": round(seconds_to_exit),
             "last_line": last_line[:120], "rerun_s": round(rerun_seconds, 1), "flow_run_states_after": states})
