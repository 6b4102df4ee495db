"""Unattended operation end to end, the README's way: `make server`, `make deploy`, `make worker`.

The nightly cron is compressed to every 15 s (MESS_AI_NIGHTLY_CRON). Then, with no `run_deployment` shortcut: the
server's scheduler creates the nightly runs and a worker executes them; a worker killed (with its flow-run
process) in the middle of a night leaves a run that the heartbeat automation marks Crashed; a later night runs and
completes with its artifacts; and the webhook receiver gets exactly one message per bad outcome (the dead night,
the night with a broken recording, a run that failed) and none for clean nights.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from datetime import datetime, timezone

import pytest

from tests.helpers.audio import write_audio, write_not_audio
from tests.helpers.nightly import ZOMBIE_SECONDS, events, kill_tree, make, nightly_env, start_make, wait_until
from tests.helpers.prefect_server import PREFECT, REPO_ROOT, free_port, stop, wait_healthy
from tests.helpers.webhook import webhook_receiver

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="uses make, process groups and /proc")

NIGHT_SECONDS = 15


def test_scheduled_nights_fire_survive_a_dead_worker_and_tell_someone(tmp_path, tiny_model):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        DeploymentFilter,
        DeploymentFilterName,
        FlowRunFilter,
    )
    from prefect.client.schemas.sorting import FlowRunSort
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from mess_ai.store import FeatureStore

    incoming, store = tmp_path / "incoming", tmp_path / "store"
    for i in range(4):
        write_audio(incoming / f"night1-{i}.wav", seconds=20.0, seed=i)
    port = free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    home = tmp_path / "prefect"
    home.mkdir()
    with webhook_receiver() as (hook_url, received):
        env = nightly_env(home, incoming, store, tiny_model, NIGHT_SECONDS, hook_url)
        server = start_make("server", env, port, home / "server.log")
        workers: list[subprocess.Popen] = []
        try:
            wait_healthy(api_url)
            # The UI is told the API's real port (it used to look on 4200 whatever the port).
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ui-settings", timeout=10) as response:
                assert json.load(response)["api_url"] == api_url
            deployed = make("deploy", env, port)
            assert "notifications: POST to the URL in MESS_AI_NOTIFY_URL" in deployed
            workers.append(start_make("worker", env, port, tmp_path / "worker-1.log"))

            with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
                nightly = client.read_deployment_by_name("extract-features/nightly")
                schedule = nightly.schedules[0].schedule
                assert (schedule.cron, schedule.timezone) == (f"* * * * * */{NIGHT_SECONDS}", "Europe/Berlin")
                manual = client.read_deployment_by_name("extract-features/manual")
                assert not manual.schedules
                schema = manual.parameter_openapi_schema
                described = schema["properties"]
                assert all(described[name].get("description") for name in ("audio_dir", "store", "config", "run"))
                # The run form shows each setting with its description (the settings objects' fields).
                assert schema["definitions"]["RunOptions"]["properties"]["gpu_limit"]["description"]
                assert schema["definitions"]["ExtractConfig"]["properties"]["model"]["description"]

                def nights():
                    return client.read_flow_runs(
                        deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["nightly"])),
                        sort=FlowRunSort.EXPECTED_START_TIME_ASC, limit=200)

                # 1. The scheduler creates the nights by itself (nothing here starts a run).
                wait_until(lambda: len(nights()) >= 3, 60, "the scheduler to create nightly runs")

                # 2. A worker picks the first night up; it is killed, with the run's process, mid-run (after the
                # run's first heartbeat, which is what the server watches for).
                def running_with_heartbeat():
                    for run in nights():
                        if run.state and run.state.is_running() and events(
                                api_url, f"prefect.flow-run.{run.id}", "prefect.flow-run.heartbeat"):
                            return run
                    return None

                for attempt in range(3):
                    night1 = wait_until(running_with_heartbeat, 120, "a night to run and send a heartbeat")
                    kill_tree(workers.pop())
                    killed_at = datetime.now(timezone.utc)
                    workers.append(start_make("worker", env, port, tmp_path / f"worker-{attempt + 2}.log"))
                    if client.read_flow_run(night1.id).state.is_running():  # nothing told the server
                        break
                    # The night ended in the moment between seeing it run and the kill: more work for the next.
                    for i in range(4):
                        write_audio(incoming / f"night1-{attempt}-{i}.wav", seconds=20.0, seed=10 + i)
                else:
                    raise AssertionError("three nights in a row ended before they could be killed")

                # 3. The heartbeat automation marks the dead night Crashed.
                crashed = wait_until(lambda: (s := client.read_flow_run(night1.id).state) and s.is_crashed() and s,
                                     ZOMBIE_SECONDS + 90, "the dead night to be marked Crashed")
                assert "No heartbeat" in crashed.message
                # A broken recording arrives before the next night.
                write_not_audio(incoming / "broken.wav")
                write_audio(incoming / "night2.wav", seconds=8.0, seed=9)
                marked_at = datetime.now(timezone.utc)

                # 4. A later night runs and completes, with its artifacts: the dead one did not block it. It is the
                # night that found the broken file (which night that is, is a race with the file's arrival: the
                # files-failed message names it).
                message = received.wait_for(lambda m: m.get("outcome") == "files-failed", 150)
                assert message, f"no files-failed message; got {received.snapshot()}"
                night2 = client.read_flow_run(message[0]["flow_run_id"])
                assert night2.deployment_id == nightly.id and night2.state.is_completed()
                assert night2.start_time > crashed.timestamp
                keys = {a.key for a in client.read_artifacts(
                    artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[night2.id])),
                    flow_run_filter=FlowRunFilter(), limit=50)}
                assert {f"mess-ai-incoming-{k}" for k in ("run-summary", "stage-times", "failed-files",
                                                          "progress")} <= keys
                # Nights due while the dead one still held the deployment's slot were cancelled by design.
                for run in nights():
                    if killed_at < run.expected_start_time < marked_at and run.state.is_cancelled():
                        assert "concurrency limit" in (run.state.message or "")

                # 5. A run that fails (its folder is gone).
                out = subprocess.run([PREFECT, "--no-prompt", "deployment", "run", "extract-features/manual",
                                      "--param", "audio_dir=/nonexistent/mess-ai"], env=dict(env, PREFECT_API_URL=api_url),
                                     cwd=REPO_ROOT, capture_output=True, text=True, timeout=120).stdout
                failed_id = next(line.split()[-1] for line in out.splitlines() if "UUID" in line)
                wait_until(lambda: client.read_flow_run(failed_id).state.is_failed(), 120,
                           "the manual run to fail")

                # 6. One message per bad outcome, none for clean nights.
                expected = {str(night1.id): "dead", str(night2.id): "files-failed", failed_id: "failed"}
                for run_id, outcome in expected.items():
                    assert received.wait_for(lambda m, r=run_id: m.get("flow_run_id") == r, 90), (
                        f"no {outcome} message for {run_id}; got {received.snapshot()}")
                time.sleep(15)  # a duplicate would come within the notification window
                messages = received.snapshot()
                by_run = {}
                for message in messages:
                    by_run.setdefault(message.get("flow_run_id"), []).append(message.get("outcome"))
                assert by_run == {run_id: [outcome] for run_id, outcome in expected.items()}, messages
                files_failed = next(m for m in messages if m["outcome"] == "files-failed")
                assert "broken.wav" in files_failed["text"]

                # 7. Nothing left Running or Pending once the schedule stops (the night due meanwhile finishes);
                # every good file done once, the broken one failed.
                client.pause_deployment(nightly.id)

                def in_flight():
                    return [r.name for r in client.read_flow_runs(limit=200)
                            if r.state and (r.state.is_running() or r.state.is_pending())]

                deadline = time.monotonic() + 90
                while in_flight() and time.monotonic() < deadline:
                    time.sleep(1)
                assert not in_flight()
            feature_store = FeatureStore(store, "incoming")
            try:
                rows = feature_store.manifest.rows_by_track("incoming")
            finally:
                feature_store.close()
            statuses = {row["relative_path"]: (row["status"], row["attempts"]) for row in rows.values()}
            assert statuses["broken.wav"][0] == "failed"
            assert all(status == "done" for path, (status, _) in statuses.items() if path != "broken.wav")
            assert len(statuses) == len(list(incoming.glob("*.wav")))

            # 8. Without MESS_AI_NOTIFY_URL, `make deploy` removes the notifications: nothing is sent.
            quiet = make("deploy", dict(env, MESS_AI_NOTIFY_URL=""), port)
            assert "notifications: none" in quiet
            with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
                names = {a.name for a in client.read_automations()}
            assert names == {"mess-ai: mark runs without heartbeats as Crashed"}
        finally:
            for worker in workers:
                stop(worker)
            stop(server)
