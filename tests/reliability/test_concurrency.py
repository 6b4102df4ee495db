"""Two runs at once on one store, and a source file replaced while it is being extracted."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import mess_ai.extraction.steps
from mess_ai.audio import discover_audio
from mess_ai.errors import StoreError
from mess_ai.config import ExtractConfig
from mess_ai.pipeline import ExtractionSession, run_extraction
from mess_ai.store import FeatureStore, Manifest, load_npy
from mess_ai.store.keys import sha256_file
from mess_ai.store.manifest import sqlite_url
from tests.helpers import extract_process
from tests.helpers.audio import write_audio
from tests.helpers.store_checks import assert_complete, rows


def test_two_runs_at_once_on_one_store(tmp_path, tiny_model, figures):
    audio, store = tmp_path / "audio", tmp_path / "store"
    for i in range(10):
        write_audio(audio / f"t{i}.wav", seconds=8.0, sample_rate=44100, seed=i)
    # Created first: a new store opened by two runs at once races (test_a_new_store_opened_by_several_runs_at_once).
    FeatureStore(store, "audio").close()
    # Batch size 2 and 3 windows per file: a file's last window waits for the next file's first, so each run
    # holds a track while it looks at the next one (what once deadlocked two runs).
    procs = [extract_process.start(audio, store, tiny_model, batch_size=2) for _ in range(2)]
    summaries = []
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise AssertionError("the two runs did not finish in 300 s") from None
        assert proc.returncode == 0, err[-3000:]
        summaries.append(json.loads(out.strip().splitlines()[-1]))

    done = [{o["track_id"] for o in s["outcomes"] if o["status"] == "done"} for s in summaries]
    everything = {s.track_id for s in discover_audio(audio)}
    assert not done[0] & done[1], "a file was extracted by both runs"
    assert done[0] | done[1] == everything
    for summary, mine in zip(summaries, done):
        # Each run accounts for every file exactly once: extracted by itself, found finished by the other run
        # (unchanged: itemised when found so while the run waited for it, only counted when found so by the plan),
        # or left to the other run while that one held it (busy).
        assert summary["done"] + summary["unchanged"] + summary["busy"] == len(everything)
        assert {o["track_id"] for o in summary["outcomes"] if o["status"] in ("unchanged", "busy")} \
            <= everything - mine
        assert summary["failed"] == 0 and summary["integrity_problems"] == []
    assert all(r["attempts"] == 1 for r in rows(store, "audio").values())
    assert_complete(store, "audio", audio)
    figures({"files": len(everything), "extracted_by_each_run": [len(d) for d in done],
             "left_busy_by_each_run": [s["busy"] for s in summaries],
             "wall_s": [round(s["wall_seconds"], 1) for s in summaries]})


def test_two_sessions_preparing_the_same_files_never_wait_for_each_other(tmp_path, tiny_model):
    """The interleaving that deadlocked two flow runs: A has prepared t0 when B starts; B finds t0 busy and
    prepares t1; then A comes to t1. A run must never wait for a track while it holds one of its own."""
    audio = tmp_path / "audio"
    for i in range(2):
        write_audio(audio / f"t{i}.wav", seconds=3.0, seed=i)
    config = ExtractConfig(model=tiny_model, device="cpu")
    sessions = [ExtractionSession(tmp_path / "store", "audio", config) for _ in range(2)]
    a, b = (s.validate(s.plan(s.discover(audio))) for s in sessions)
    # As a chunk's decode-ahead thread takes its tracks, one after the other (session.preprocess).
    prepared = [sessions[0].preprocess(a), sessions[1].preprocess(b)]
    first = [next(prepared[0]), next(prepared[1])]
    results: dict[int, list] = {}
    threads = [threading.Thread(target=lambda k=k: results.setdefault(k, list(prepared[k])), daemon=True)
               for k in (0, 1)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 8.0  # preparing one 3 s file takes well under a second
    for thread in threads:
        thread.join(timeout=max(0.0, deadline - time.monotonic()))
    stuck = [thread.is_alive() for thread in threads]
    if any(stuck):  # break the deadlock so the threads end: give back what was prepared
        for k in (0, 1):
            sessions[k].abandon(first[k])
            threads[1 - k].join(timeout=20)
            for job in results.get(1 - k, []):
                sessions[1 - k].abandon(job)
        for session in sessions:
            session.close()
    assert not any(stuck), "the two runs wait for each other forever"

    done = [{o.track_id for o in session.extract([first[k], *results[k]]) if o.status == "done"}
            for k, session in enumerate(sessions)]
    busy = [{o.track_id for o in session.outcomes.values() if o.status == "busy"} for session in sessions]
    for session in sessions:
        session.close()
    assert not done[0] & done[1] and len(done[0] | done[1]) == 2
    assert busy == [done[1], done[0]]  # each left to the other the track the other held
    assert_complete(tmp_path / "store", "audio", audio)


def test_a_new_store_opened_by_several_runs_at_once(tmp_path):
    for trial in range(10):
        url = sqlite_url(str(tmp_path / f"manifest-{trial}.sqlite"))
        start = threading.Barrier(4)
        errors = []

        def open_manifest():
            start.wait()
            try:
                Manifest(url).close()
            except StoreError as exc:
                errors.append(exc)

        threads = [threading.Thread(target=open_manifest) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors, f"trial {trial}: {errors[0]}"


# --- a source file replaced while it is being extracted -------------------------------------------------------

def _features(tmp_path, tiny_model, name, data, sample_rate):
    """Segments of one recording extracted on its own: what features of exactly these bytes look like."""
    folder = tmp_path / f"reference-{len(list(tmp_path.glob('reference-*')))}"
    write_audio(folder / "audio" / name, data=data, sample_rate=sample_rate)
    summary = run_extraction(folder / "audio", folder / "store", config=ExtractConfig(model=tiny_model, device="cpu"))
    return load_npy(folder / "store" / "audio" / "segments" / f"{summary.outcomes[0].track_id}.npy")


def _versions(seconds=6.0, sample_rate=24000):
    rng = np.random.default_rng(0)
    old = (0.3 * rng.standard_normal((int(seconds * sample_rate), 1))).astype(np.float32)
    new = (0.3 * np.sin(np.linspace(0, 2000, len(old)))[:, None]).astype(np.float32)
    return old, new


def _replace(path, data, sample_rate, keep_stat):
    """Put new bytes at ``path`` the way a copy tool does (a temporary file renamed over it); with ``keep_stat``
    the new file also gets the old size (same length and format) and the old mtime (``cp -p``, ``rsync -t``)."""
    before = path.stat()
    temporary = path.with_name(".incoming-" + path.name)
    write_audio(temporary, data=data, sample_rate=sample_rate)
    if keep_stat:
        assert temporary.stat().st_size == before.st_size
        os.utime(temporary, ns=(before.st_atime_ns, before.st_mtime_ns))
    os.replace(temporary, path)


def _extract_replacing(monkeypatch, tmp_path, tiny_model, when, keep_stat):
    """Extract ``song.wav`` while it is replaced before or after it is decoded; returns what each version's
    features are, the stored features and the manifest row."""
    old, new = _versions()
    audio = tmp_path / "audio"
    path = write_audio(audio / "song.wav", data=old, sample_rate=24000)
    sha = {"old": sha256_file(path)}
    real_load = mess_ai.extraction.steps.load_mono

    replaced = []

    def load_and_replace(source_path, rate, **kwargs):
        # The pipeline has hashed the file (its manifest row has the old bytes' sha256) and now decodes it.
        # Replaced once: a pipeline that reads the file again must find the new bytes there.
        if when == "before decoding" and not replaced:
            _replace(path, new, 24000, keep_stat)
            replaced.append(when)
        signal = real_load(source_path, rate, **kwargs)
        if when == "after decoding" and not replaced:
            _replace(path, new, 24000, keep_stat)
            replaced.append(when)
        return signal

    monkeypatch.setattr(mess_ai.extraction.steps, "load_mono", load_and_replace)
    summary = run_extraction(audio, tmp_path / "store", config=ExtractConfig(model=tiny_model, device="cpu"))
    monkeypatch.undo()
    assert summary.done == 1
    track_id = summary.outcomes[0].track_id
    stored = load_npy(tmp_path / "store" / "audio" / "segments" / f"{track_id}.npy")
    reference = {"old": _features(tmp_path, tiny_model, "song.wav", old, 24000),
                 "new": _features(tmp_path, tiny_model, "song.wav", new, 24000)}
    row = rows(tmp_path / "store", "audio")[track_id]
    sha["new"] = sha256_file(path)
    return audio, path, stored, reference, row, sha


def _came_from(stored, reference):
    matches = [name for name, features in reference.items() if np.allclose(stored, features, atol=1e-5)]
    assert len(matches) == 1, "the stored features match neither version (or both)"
    return matches[0]


@pytest.mark.parametrize("when", ["before decoding", "after decoding"])
def test_replaced_file_is_read_again_so_the_row_describes_the_features(monkeypatch, tmp_path, tiny_model, when):
    audio, path, stored, reference, row, sha = _extract_replacing(monkeypatch, tmp_path, tiny_model, when,
                                                                  keep_stat=False)
    # The file was replaced (a new inode renamed over it) between the hash and the end of the decode: the run
    # hashed and decoded the one file its descriptor holds, so the features and the row both describe the old
    # bytes; the next run sees new bytes at the path and extracts them.
    assert _came_from(stored, reference) == "old"
    assert row["sha256"] == sha["old"] and row["attempts"] == 1
    summary = run_extraction(audio, tmp_path / "store", config=ExtractConfig(model=tiny_model, device="cpu"))
    assert (summary.done, summary.unchanged) == (1, 0)
    assert _came_from(load_npy(tmp_path / "store" / "audio" / "segments" / f"{row['track_id']}.npy"),
                      reference) == "new"
    assert_complete(tmp_path / "store", "audio", audio)


def test_replaced_keeping_size_and_mtime_is_caught(monkeypatch, tmp_path, tiny_model):
    """``cp -p`` / ``rsync -t`` of an edit of equal length keep size and mtime; the inode's change time moves, so
    the next run sees the new bytes although the row's size and mtime match."""
    audio, path, stored, reference, row, sha = _extract_replacing(monkeypatch, tmp_path, tiny_model,
                                                                  "before decoding", keep_stat=True)
    assert _came_from(stored, reference) == "old" and row["sha256"] == sha["old"]
    summary = run_extraction(audio, tmp_path / "store", config=ExtractConfig(model=tiny_model, device="cpu"))
    assert (summary.done, summary.unchanged) == (1, 0)
    assert_complete(tmp_path / "store", "audio", audio)


def test_a_file_rewritten_in_place_while_decoded_is_read_again(monkeypatch, tmp_path, tiny_model):
    """The same inode written over while it is decoded (an editor saving in place): the descriptor's identity
    moves, so the run hashes and decodes it again; features and row describe the bytes now in the file."""
    old, new = _versions()
    audio = tmp_path / "audio"
    path = write_audio(audio / "song.wav", data=old, sample_rate=24000)
    real_load = mess_ai.extraction.steps.load_mono
    rewritten = []

    def load_and_rewrite(opened, rate, **kwargs):
        signal = real_load(opened, rate, **kwargs)
        if not rewritten:
            inode = path.stat().st_ino
            new_bytes = write_audio(tmp_path / "new.wav", data=new, sample_rate=24000).read_bytes()
            with open(path, "r+b") as fh:  # in place: same inode
                fh.write(new_bytes)
                fh.truncate()
            assert path.stat().st_ino == inode
            rewritten.append(True)
        return signal

    monkeypatch.setattr(mess_ai.extraction.steps, "load_mono", load_and_rewrite)
    summary = run_extraction(audio, tmp_path / "store", config=ExtractConfig(model=tiny_model, device="cpu"))
    monkeypatch.undo()
    assert summary.done == 1 and rewritten
    track_id = summary.outcomes[0].track_id
    stored = load_npy(tmp_path / "store" / "audio" / "segments" / f"{track_id}.npy")
    reference = {"old": _features(tmp_path, tiny_model, "song.wav", old, 24000),
                 "new": _features(tmp_path, tiny_model, "song.wav", new, 24000)}
    assert _came_from(stored, reference) == "new"
    assert rows(tmp_path / "store", "audio")[track_id]["sha256"] == sha256_file(path)
    assert_complete(tmp_path / "store", "audio", audio)


def test_file_that_keeps_changing_is_recorded_and_retried(monkeypatch, tmp_path, tiny_model):
    audio = tmp_path / "audio"
    path = write_audio(audio / "growing.wav", seconds=3.0)
    real_load = mess_ai.extraction.steps.load_mono

    def load_while_written(source_path, rate, **kwargs):
        signal = real_load(source_path, rate, **kwargs)
        os.utime(path, ns=(time.time_ns(), time.time_ns()))  # still being written by something else
        return signal

    monkeypatch.setattr(mess_ai.extraction.steps, "load_mono", load_while_written)
    summary = run_extraction(audio, tmp_path / "store", config=ExtractConfig(model=tiny_model, device="cpu"))
    monkeypatch.undo()
    (outcome,) = summary.outcomes
    assert outcome.status == "failed" and "kept changing while it was read" in outcome.reason
    assert outcome.permanent is False and summary.integrity_problems == []
    again = run_extraction(audio, tmp_path / "store", config=ExtractConfig(model=tiny_model, device="cpu"))
    assert again.done == 1
    assert_complete(tmp_path / "store", "audio", audio)


def _extract_while_one_file_vanishes(monkeypatch, tmp_path, tiny_model):
    """Extract two files; one is moved away after its header was checked, just before it is opened to be hashed
    and decoded. Returns the summary. (Moved once it is open, it would be read whole from its descriptor.)"""
    audio = tmp_path / "audio"
    write_audio(audio / "stays.wav", seconds=3.0)
    write_audio(audio / "vanishes.wav", seconds=3.0, frequency=300)
    real_open = mess_ai.extraction.steps.open_audio

    def open_audio(source_path, *args, **kwargs):
        if Path(source_path).name == "vanishes.wav":
            shutil.move(source_path, tmp_path / "parked.wav")
        return real_open(source_path, *args, **kwargs)

    monkeypatch.setattr(mess_ai.extraction.steps, "open_audio", open_audio)
    summary = run_extraction(audio, tmp_path / "store", config=ExtractConfig(model=tiny_model, device="cpu"))
    monkeypatch.undo()
    return summary


def test_file_vanishing_mid_run_is_recorded_and_the_run_goes_on(monkeypatch, tmp_path, tiny_model):
    summary = _extract_while_one_file_vanishes(monkeypatch, tmp_path, tiny_model)
    outcomes = {o.relative_path: o for o in summary.outcomes}
    assert outcomes["stays.wav"].status == "done"
    assert outcomes["vanishes.wav"].status == "failed" and "No such file" in outcomes["vanishes.wav"].reason
    assert outcomes["vanishes.wav"].permanent is False  # nothing is known to be wrong with the bytes: retried
    assert summary.integrity_problems == []
    fs = FeatureStore(tmp_path / "store", "audio")
    assert not fs.path("segments", outcomes["vanishes.wav"].track_id).exists()
    fs.close()


def test_file_back_after_vanishing_is_extracted(monkeypatch, tmp_path, tiny_model):
    _extract_while_one_file_vanishes(monkeypatch, tmp_path, tiny_model)
    shutil.move(tmp_path / "parked.wav", tmp_path / "audio" / "vanishes.wav")
    summary = run_extraction(tmp_path / "audio", tmp_path / "store",
                             config=ExtractConfig(model=tiny_model, device="cpu"))
    assert {o.relative_path: o.status for o in summary.outcomes} == {"vanishes.wav": "done"}
    assert summary.unchanged == 1  # stays.wav: counted, not itemised
