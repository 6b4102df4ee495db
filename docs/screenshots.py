"""Regenerate the screenshots in docs/img/ for docs/operations.md, from a real Prefect server in headless Chromium.

    .venv/bin/python docs/screenshots.py        # from the repository root; needs `chromium` (apt-get install chromium)

What it does, as an operator would: a Prefect server on a free loopback port (SQLite in a temporary folder), the
deployments of prefect.yaml on a process work pool, one process worker, then three runs on synthetic audio with one
broken file: `manual` (first extraction), `nightly` after one new recording arrives (shows what a nightly run
skips), `retry-failed` (the broken file again). The model is a tiny MERT-format checkpoint with RANDOM weights, so
the numbers in the screenshots show the plumbing, not musical meaning. Nothing outside the temporary folder and
docs/img/ is touched.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from cli.demo import write_demo_audio  # noqa: E402
from mess_ai.features.random_checkpoints import write_test_model  # noqa: E402
from tests.helpers.audio import write_audio  # noqa: E402
from tests.helpers.prefect_server import PREFECT, prefect_server, start, stop  # noqa: E402

IMG_DIR = REPO_ROOT / "docs" / "img"
POOL = "mess-ai-process"
DATASET_KEY = "mess-ai-incoming"  # artifact keys of the dataset "incoming" (the audio folder's name)
NAV_WIDTH = 255  # the UI's left navigation bar, cropped off every screenshot (pixels at 1400 wide)


def prefect_cli(env: dict[str, str], *args: str) -> str:
    proc = subprocess.run([PREFECT, "--no-prompt", *args], env=env, cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"prefect {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout


def run_and_wait(env: dict[str, str], client, deployment: str, worker_log: Path) -> str:
    """Start a run of ``deployment`` as `prefect deployment run` does and wait until it is Completed; its id."""
    out = prefect_cli(env, "deployment", "run", deployment)
    flow_run_id = next(line.split()[-1] for line in out.splitlines() if "UUID" in line)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        state = client.read_flow_run(flow_run_id).state
        if state is not None and state.is_final():
            if not state.is_completed():
                raise RuntimeError(f"{deployment}: {state}\n{worker_log.read_text(errors='replace')[-3000:]}")
            return flow_run_id
        time.sleep(1)
    raise TimeoutError(f"{deployment} did not finish in 300 s\n{worker_log.read_text(errors='replace')[-3000:]}")


def artifact_id(client, key: str, flow_run_id: str) -> str:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
        key=ArtifactFilterKey(any_=[key]), flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    return str(artifacts[0].id)


def screenshot(url: str, name: str, window: tuple[int, int], crop: tuple[int, int, int, int]) -> Path:
    """Headless Chromium at ``window`` (width, height), then the ``crop`` box (left, top, right, bottom) kept and
    stored as a palette PNG (the UI has few colours; it keeps each file well under 300 KB)."""
    from PIL import Image

    raw = Path(tempfile.mkdtemp()) / "raw.png"
    profile = tempfile.mkdtemp()
    try:
        subprocess.run(
            ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--hide-scrollbars", f"--user-data-dir={profile}", f"--window-size={window[0]},{window[1]}",
             # virtual time lets the single-page app fetch its data and render before the picture is taken
             "--virtual-time-budget=15000", f"--screenshot={raw}", url],
            check=True, capture_output=True, timeout=120, env=dict(os.environ, TZ="UTC"))
        out = IMG_DIR / name
        with Image.open(raw) as image:
            image.convert("RGB").crop(crop).quantize(colors=256).save(out, optimize=True)
    finally:
        shutil.rmtree(raw.parent, ignore_errors=True)
        shutil.rmtree(profile, ignore_errors=True)
    print(f"{out.relative_to(REPO_ROOT)}: {out.stat().st_size // 1024} KB  <- {url}")
    return out


def main() -> int:
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if shutil.which("chromium") is None:
        raise SystemExit("chromium not found: apt-get install -y chromium")
    IMG_DIR.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory(prefix="mess-ai-screenshots-") as tmp_name:
        tmp = Path(tmp_name)
        incoming, store, model = tmp / "incoming", tmp / "store", tmp / "model"
        write_demo_audio(incoming)  # five recordings and broken/not_really_audio.wav
        write_test_model(model, size="tiny")
        with prefect_server(tmp / "prefect") as (api_url, env):
            env.update(MESS_AI_INCOMING=str(incoming), MESS_AI_STORE=str(store), MESS_AI_MODEL=str(model),
                       MESS_AI_TIMEZONE="Europe/Berlin", MESS_AI_CODE_DIR=str(REPO_ROOT),
                       PREFECT_WORKER_QUERY_SECONDS="2")
            ui = api_url.removesuffix("/api") + "/v2"
            prefect_cli(env, "work-pool", "create", POOL, "--type", "process")
            prefect_cli(env, "deploy", "--all")
            worker_log = tmp / "worker.log"
            worker = start([PREFECT, "worker", "start", "--pool", POOL], env, worker_log)
            try:
                with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
                    manual_run = run_and_wait(env, client, "extract-features/manual", worker_log)
                    write_audio(incoming / "strings" / "new_take.wav", seconds=8.0, sample_rate=44100)
                    nightly_run = run_and_wait(env, client, "extract-features/nightly", worker_log)
                    retry_run = run_and_wait(env, client, "extract-features/retry-failed", worker_log)
                    manual = client.read_deployment_by_name("extract-features/manual").id
                    summary = artifact_id(client, f"{DATASET_KEY}-run-summary", nightly_run)
                    failed = artifact_id(client, f"{DATASET_KEY}-failed-files", retry_run)
            finally:
                stop(worker)
            # Window sizes and crop boxes fit Prefect 3.8's UI: look at the images again after a Prefect upgrade.
            screenshot(f"{ui}/deployments", "deployments.png", (1400, 700), (NAV_WIDTH, 0, 1400, 620))
            screenshot(f"{ui}/deployments/deployment/{manual}/run", "custom-run.png", (1400, 3000),
                       (NAV_WIDTH, 0, 1400, 1815))
            screenshot(f"{ui}/runs/flow-run/{manual_run}?tab=Artifacts", "flow-run-artifacts.png", (1400, 1150),
                       (NAV_WIDTH, 0, 1400, 1100))
            screenshot(f"{ui}/runs/flow-run/{nightly_run}?tab=Logs", "flow-run-logs.png", (1400, 2200),
                       (NAV_WIDTH, 505, 1400, 1770))
            screenshot(f"{ui}/artifacts/artifact/{summary}", "run-summary.png", (1400, 800),
                       (NAV_WIDTH, 0, 1400, 760))
            screenshot(f"{ui}/artifacts/artifact/{failed}", "failed-files.png", (2100, 600),
                       (NAV_WIDTH, 0, 1680, 430))
            screenshot(f"{ui}/artifacts/key/{DATASET_KEY}-failed-files", "failed-files-history.png", (1400, 700),
                       (NAV_WIDTH, 0, 1400, 560))
            screenshot(f"{ui}/concurrency-limits", "concurrency.png", (1400, 600), (NAV_WIDTH, 0, 1400, 480))
    print(json.dumps({"manual": manual_run, "nightly": nightly_run, "retry-failed": retry_run}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
