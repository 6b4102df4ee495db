"""SIGKILL during extraction: nothing partial is left as a feature file, and a re-run finishes cleanly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from mess_ai.store import FeatureStore, check_store, load_npy
from mess_ai.store.atomic import TEMP_MARKER
from mess_ai.store.manifest import Manifest, sqlite_url
from tests.helpers.audio import write_audio


# No GPU limit here: a killed run's slot lease would hold the next run back until it expires (a minute), and
# this test is about the store. tests/test_flows.py covers the limit.
def _env(api_url):
    # The subprocess talks to the session's Prefect API instead of starting a temporary one of its own.
    return dict(os.environ, PYTHONUNBUFFERED="1", PREFECT_API_URL=api_url)


def _start(audio, store, model, api_url):
    env = _env(api_url)
    return subprocess.Popen(
        [sys.executable, "-m", "cli", "-q", "extract", str(audio), "--store", str(store), "--model", model,
         "--device", "cpu", "--keep-raw", "--batch-size", "2", "--gpu-limit", ""],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _wait_for_progress(store, proc, done_at_least=0, timeout=120.0):
    """Until the first feature file or temporary file exists (the run is mid-way), and ``done_at_least`` tracks
    are done. (Progress, not time: after its start-up a run takes about a second for all of its files here, so a
    kill a second after the first write often came after the last.)"""
    deadline = time.monotonic() + timeout
    manifest = None
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"extraction ended before it could be killed: {proc.stderr.read().decode()}")
            if any(p.suffix == ".npy" or TEMP_MARKER in p.name for p in store.rglob("*") if p.is_file()):
                if not done_at_least:
                    return
                manifest = manifest or Manifest(sqlite_url(str(store / "manifest.sqlite")))
                if len(manifest.rows("audio", "done")) >= done_at_least:
                    return
            time.sleep(0.005)
    finally:
        if manifest is not None:
            manifest.close()
    pytest.fail("no progress to interrupt")


N_FILES = 12


# Killed at the first write in `make soak` only (the CI suite's time is short; the mid-run kill covers the same
# promise, and the soak kills 24 times at random points).
@pytest.mark.parametrize("done_at_kill", [pytest.param(0, marks=pytest.mark.soak), 4])
def test_sigkill_mid_run_then_rerun_is_clean(tmp_path, tiny_model, done_at_kill, prefect_api):
    audio, store = tmp_path / "audio", tmp_path / "store"
    for i in range(N_FILES):
        write_audio(audio / f"track{i}.wav", seconds=40.0, sample_rate=44100, seed=i)
    proc = _start(audio, store, tiny_model, prefect_api)
    _wait_for_progress(store, proc, done_at_kill)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL

    # Whatever a feature file is there must be complete: every .npy reads back whole.
    for path in store.rglob("*.npy"):
        if TEMP_MARKER not in path.name:
            load_npy(path)
    fs = FeatureStore(store, "audio")
    done_before = {r["track_id"] for r in fs.manifest.rows("audio", "done")}
    assert len(done_before) < N_FILES, "the kill came too late to interrupt anything"
    fs.close()

    rerun = subprocess.run(
        [sys.executable, "-m", "cli", "extract", str(audio), "--store", str(store), "--model", tiny_model,
         "--device", "cpu", "--keep-raw", "--gpu-limit", ""], capture_output=True, text=True, timeout=300, env=_env(prefect_api))
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    report = check_store(store)
    assert report.ok, report.problems
    assert not [p for p in store.rglob("*") if TEMP_MARKER in p.name]
    fs = FeatureStore(store, "audio")
    rows = fs.manifest.rows("audio")
    assert len(rows) == N_FILES and all(r["status"] == "done" for r in rows)
    for r in rows:
        segments = load_npy(fs.path("segments", r["track_id"]))
        assert segments.shape == (r["n_windows"], 3, 32) and np.isfinite(segments).all()
    fs.close()
