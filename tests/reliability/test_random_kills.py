"""SIGKILL at random points of a run, again and again: after each kill the store holds no partial file, every file
is done or pending, no lock is left behind, and a re-run completes with each file extracted exactly once."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
import pytest

from mess_ai.audio import discover_audio
from mess_ai.store import DONE, FeatureStore, check_store
from mess_ai.store.keys import sha256_file
from tests.helpers import extract_process
from tests.helpers.audio import write_audio
from tests.helpers.store_checks import assert_complete, assert_consistent_after_crash, rows, temp_files

DATASET = "audio"


@dataclass
class Cycle:
    runner: str  # "process" (plain pipeline) or "flow" (the mess-ai CLI: a Prefect flow run)
    anchor: str  # the kill came at a random moment after the start, or after the first feature file appeared
    work: int  # files that needed extracting when the run started
    delay: float  # seconds from start to SIGKILL
    killed: bool  # False when the run had finished before the kill came
    interrupted: str  # what the kill landed on: starting, a track, a write, between tracks
    done_at_kill: int
    rerun_seconds: float
    rerun_done: int
    rerun_unchanged: int


def _cli(audio, store, model, api_url, *, json_out=False):
    cmd = [sys.executable, "-m", "cli", "-q", "extract", str(audio), "--store", str(store), "--model", model,
           "--device", "cpu", "--keep-raw", "--batch-size", "2", "--gpu-limit", ""] + (["--json"] if json_out else [])
    env = dict(extract_process.environment(), PREFECT_API_URL=api_url)
    return subprocess.Popen(cmd, cwd=extract_process.REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _rerun(runner, audio, store, model, api_url, timeout):
    """A run to its end; returns its summary."""
    if runner == "process":
        return extract_process.run(audio, store, model, timeout=timeout, keep_raw=True, batch_size=2)
    proc = _cli(audio, store, model, api_url, json_out=True)
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode in (0, 1), err[-3000:]
    return json.loads(out[out.index("{"):])


def _feature_files_now(store):
    """{path: mtime} of every feature and temporary file of the raw and segments scales."""
    folders = [store / DATASET / scale for scale in ("raw", "segments")]
    return {p: p.stat().st_mtime_ns for folder in folders if folder.is_dir() for p in folder.iterdir()}


def _wait_for_first_write(store, proc, before, timeout):
    """Until the run writes a feature file (a new or rewritten one, or a temporary one), or ends."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if any(before.get(path) != mtime for path, mtime in _feature_files_now(store).items()):
                return
        except FileNotFoundError:  # a temporary file renamed while we looked
            pass
        time.sleep(0.02)


def _settled(store, audio) -> set[str]:
    """Tracks done from the bytes the file has now: a re-run must leave exactly these alone."""
    found = rows(store, DATASET)
    return {s.track_id for s in discover_audio(audio)
            if s.track_id in found and found[s.track_id]["status"] == DONE
            and found[s.track_id]["sha256"] == sha256_file(s.path)}


def _interrupted(before: dict, after: dict, temps: int) -> str:
    if temps:
        return "a write"
    if any(r["status"] == "pending" for r in after.values()):
        return "a track"
    changed = any(after[t]["last_attempt_at"] != before.get(t, {}).get("last_attempt_at") for t in after)
    return "between tracks" if changed else "starting"


def _no_lock_left(store, audio) -> None:
    """Every track can be locked at once: the killed run holds nothing (its flocks died with it, and its claims
    in the manifest are taken over)."""
    fs = FeatureStore(store, DATASET)
    try:
        for source in discover_audio(audio):
            lock = fs.lock(source.track_id)
            lock.acquire()
            lock.release()
    finally:
        fs.close()


def kill_cycles(tmp_path, model, kills, *, files, seconds, seed, api_url=None, rerun_timeout=300.0):
    """Cycles of: change some files, start a run, SIGKILL it at a random moment, check the store, re-run to
    completion, check again; until ``kills`` runs were killed (a run may finish before its kill comes). Every
    other cycle goes through the Prefect CLI when ``api_url`` is given."""
    rng = np.random.default_rng(seed)
    audio, store = tmp_path / "audio", tmp_path / "store"
    for i in range(files):
        write_audio(audio / f"track{i:02d}.wav", seconds=seconds, sample_rate=44100, seed=i)
    # First guesses of how long a run takes to start and per file, replaced by what the re-runs measure.
    startup = {"process": 4.0, "flow": 10.0}
    per_file = {"process": 1.0, "flow": 1.0}
    timings: dict[str, list[tuple[int, float]]] = {"process": [], "flow": []}
    cycles: list[Cycle] = []
    while sum(c.killed for c in cycles) < kills:
        assert len(cycles) < 2 * kills, [asdict(c) for c in cycles]
        n = len(cycles)
        if n:
            for i in rng.choice(files, size=int(rng.integers(1, max(1, files // 2) + 1)), replace=False):
                write_audio(audio / f"track{i:02d}.wav", seconds=seconds, sample_rate=44100, seed=1000 * n + i)
        runner = "flow" if api_url and n % 2 else "process"
        work = files - len(_settled(store, audio)) if store.exists() else files
        before = rows(store, DATASET) if store.exists() else {}
        files_before = _feature_files_now(store)
        # Half the kills come at a random moment of the whole run, start-up included; the other half at a random
        # moment within a file's work after the run's first write, so that they land on model work and writes.
        anchor = ("first write", "start", "start", "first write")[n % 4]
        proc = (_cli(audio, store, model, api_url) if runner == "flow"
                else extract_process.start(audio, store, model, keep_raw=True, batch_size=2))
        started = time.monotonic()
        if anchor == "first write":
            _wait_for_first_write(store, proc, files_before, timeout=rerun_timeout)
            delay = float(rng.uniform(0.0, per_file[runner]))  # within about one file's work
        else:
            delay = float(rng.uniform(0.0, startup[runner] + per_file[runner] * work))
        try:
            proc.wait(timeout=delay)
            killed = False
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=60)
            killed = True
        delay = time.monotonic() - started
        if not killed:
            assert proc.returncode == 0, proc.stderr.read()[-3000:]
        temps = len(temp_files(store))
        counts = assert_consistent_after_crash(store, DATASET, audio)
        _no_lock_left(store, audio)
        interrupted = _interrupted(before, rows(store, DATASET), temps) if killed else "nothing (finished)"
        settled = _settled(store, audio)

        started = time.monotonic()
        summary = _rerun(runner, audio, store, model, api_url, rerun_timeout)
        rerun_seconds = time.monotonic() - started
        statuses = {o["track_id"]: o["status"] for o in summary["outcomes"]}
        assert summary["unchanged"] == len(settled)  # counted, not itemised
        assert {t for t, s in statuses.items() if s == "done"} == {s.track_id for s in discover_audio(audio)} - settled
        assert summary["failed"] == 0 and summary["integrity_problems"] == []
        assert_complete(store, DATASET, audio, keep_raw=True)

        timings[runner].append((summary["done"], rerun_seconds))
        startup[runner], per_file[runner] = _fit(timings[runner], startup[runner], per_file[runner])
        cycles.append(Cycle(runner, anchor, work, round(delay, 2), killed, interrupted, counts[DONE],
                            round(rerun_seconds, 1), summary["done"], summary["unchanged"]))
    return cycles


def _fit(timings, startup, per_file):
    """Start-up seconds and seconds per file, fitted to the (files extracted, seconds) of the re-runs so far."""
    if len({done for done, _ in timings}) < 2:
        done, seconds = timings[-1]
        return (max(0.5, seconds - per_file * done), per_file) if done else (seconds, per_file)
    slope, intercept = np.polyfit(*zip(*timings), 1)
    return max(0.5, float(intercept)), max(0.2, float(slope))


_KILLED_WRITER = """
import sys, time
from mess_ai.store import FeatureStore
from mess_ai.store.atomic import atomic_target
store = FeatureStore(sys.argv[1], "audio")
lock = store.lock("t0-000000000000")
lock.acquire()
with atomic_target(store.path("raw", "t0-000000000000")) as temporary:
    temporary.write_bytes(b"the first half of a file")
    print("writing", flush=True)
    time.sleep(600)
"""


def test_check_right_after_a_kill_reports_what_the_killed_run_left(tmp_path):
    """While a run writes, its temporary file is no problem; once the run is killed, it is one. (The killed
    process's claim in the manifest must not make the file look in use until the next run takes it over.)"""
    store = tmp_path / "store"
    writer = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(store)], cwd=extract_process.REPO,
                              env=extract_process.environment(), stdout=subprocess.PIPE, text=True)
    assert writer.stdout.readline().strip() == "writing"
    assert check_store(store, DATASET).ok
    writer.kill()
    writer.wait()
    assert [p.reason for p in check_store(store, DATASET).problems] == [
        "temporary file left by an interrupted write"]


def _figures(cycles):
    killed = [c for c in cycles if c.killed]
    where = {}
    for c in killed:
        where[c.interrupted] = where.get(c.interrupted, 0) + 1
    return {"cycles": len(cycles), "kills": len(killed), "kills_by_runner": {
        r: sum(c.runner == r for c in killed) for r in ("process", "flow")},
        "kill_landed_on": where, "kill_delay_s": [c.delay for c in killed],
        "rerun_s_median": float(np.median([c.rerun_seconds for c in cycles])),
        "rerun_s_max": max(c.rerun_seconds for c in cycles),
        "files_reextracted": sum(c.rerun_done for c in cycles), "files_skipped": sum(c.rerun_unchanged for c in cycles)}


def test_repeated_sigkill_then_rerun(tmp_path, tiny_model, figures):
    # One kill here (the suite's time); `make soak` kills 24 times.
    cycles = kill_cycles(tmp_path, tiny_model, kills=1, files=3, seconds=10.0, seed=7)
    figures(_figures(cycles))


@pytest.mark.soak
def test_soak_sigkill_24_times_through_pipeline_and_flow(tmp_path, tiny_model, prefect_api, figures):
    started = time.monotonic()
    cycles = kill_cycles(tmp_path, tiny_model, kills=24, files=10, seconds=20.0, seed=2026, api_url=prefect_api)
    data = _figures(cycles)
    data["total_s"] = round(time.monotonic() - started)
    data["cycles_detail"] = [asdict(c) for c in cycles]
    figures(data)
    assert data["kills"] == 24, data
