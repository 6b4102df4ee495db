"""End to end against a real Prefect server: deploy prefect.yaml, start a process worker, run `manual`."""

from __future__ import annotations

import json
import subprocess
import sys
import time

from tests.helpers.audio import write_audio, write_not_audio
from tests.helpers.prefect_server import PREFECT, REPO_ROOT, prefect_server, start, stop


def prefect_cli(env, *args, timeout=300):
    proc = subprocess.run([PREFECT, "--no-prompt", *args], env=env, cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, f"prefect {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def test_deploy_worker_manual_run_and_nightly_schedule(tmp_path, tiny_model):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, FlowRunFilter
    from prefect.settings import PREFECT_API_URL, temporary_settings

    incoming, store = tmp_path / "incoming", tmp_path / "store"
    write_audio(incoming / "a.wav", seconds=3.0)
    write_audio(incoming / "b.flac", seconds=6.0, sample_rate=44100, channels=2)
    write_not_audio(incoming / "c.wav")
    with prefect_server(tmp_path / "prefect") as (api_url, env):
        env.update(MESS_AI_INCOMING=str(incoming), MESS_AI_STORE=str(store), MESS_AI_MODEL=tiny_model,
                   MESS_AI_TIMEZONE="Europe/Berlin", MESS_AI_CODE_DIR=str(REPO_ROOT),
                   MESS_AI_MANIFEST_URL="")
        prefect_cli(env, "work-pool", "create", "mess-ai-process", "--type", "process")
        prefect_cli(env, "deploy", "--all")
        worker = start([PREFECT, "worker", "start", "--pool", "mess-ai-process"], env, tmp_path / "worker.log")
        try:
            out = prefect_cli(env, "deployment", "run", "extract-features/manual", "--params",
                              json.dumps({"device": "cpu", "files_per_task": 1}))
            flow_run_id = next(line.split()[-1] for line in out.splitlines() if "UUID" in line)
            with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
                deadline = time.monotonic() + 300
                while time.monotonic() < deadline:
                    state = client.read_flow_run(flow_run_id).state
                    if state is not None and state.is_final():
                        break
                    time.sleep(1)
                log = (tmp_path / "worker.log").read_text(errors="replace")
                assert state is not None and state.is_completed(), f"{state}\n{log[-3000:]}"
                keys = {a.key for a in client.read_artifacts(
                    artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])),
                    flow_run_filter=FlowRunFilter(), limit=50)}
                dataset = "mess-ai-incoming"
                assert {f"{dataset}-{k}" for k in ("run-summary", "stage-times", "memory", "gpu", "failed-files",
                                                   "progress")} <= keys
                nightly = client.read_deployment_by_name("extract-features/nightly")
                schedule = nightly.schedules[0].schedule
                assert (schedule.cron, schedule.timezone) == ("0 2 * * *", "Europe/Berlin")
                assert nightly.parameters["audio_dir"] == str(incoming)
                manual = client.read_deployment_by_name("extract-features/manual")
                assert not manual.schedules
                described = manual.parameter_openapi_schema["properties"]
                assert all(described[name].get("description") for name in ("audio_dir", "store", "gpu_limit"))
        finally:
            stop(worker)
    summary = json.loads(subprocess.run([sys.executable, "-m", "mess_ai.cli", "failures", "--store", str(store),
                                         "--json"], capture_output=True, text=True).stdout)
    assert [r["relative_path"] for r in summary] == ["c.wav"]
