"""Hostile input and operator mistakes: nothing is lost, nothing is merged, no run hangs (issue 11).

Real files on disk, real FIFOs, real manifests, the tiny checkpoint; the process deaths of the poison-file test
are real SIGKILLs of a real extraction process.
"""

from __future__ import annotations

import errno
import hashlib
import os
import signal
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from mess_ai.audio import discover_audio
from mess_ai.analysis.loading import read_tracks
from mess_ai.errors import DatasetMismatchError, StoreError
from mess_ai.config import ExtractConfig
from mess_ai.pipeline import (
    UNFINISHED_BEFORE_GIVING_UP,
    ExtractionSession,
    chunk_sources,
    run_extraction,
)
from mess_ai.audio.windows import WindowSpec
from mess_ai.store import DONE, FAILED, PENDING, FeatureStore, check_store
from mess_ai.store.manifest import Manifest, sqlite_url
from tests.helpers import extract_process
from tests.helpers.audio import write_audio
from tests.helpers.store_checks import rows


def config(model: str, **kwargs) -> ExtractConfig:
    return ExtractConfig(model=model, device="cpu", **kwargs)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def features_digests(store: Path, dataset: str) -> dict[str, str]:
    return {p.relative_to(store).as_posix(): digest(p) for p in sorted((store / dataset).glob("*/*.npy"))}


# --- dataset identity ----------------------------------------------------------------------------------------
def test_a_folder_of_the_same_name_elsewhere_is_refused_and_loses_nothing(tmp_path, tiny_model):
    """`2023/audio` and `2024/audio` both default to the dataset `audio`: the second run is refused before
    it touches anything, and says how to name a dataset; named, it gets its own."""
    for year, frequency in (("2023", 330), ("2024", 550)):
        write_audio(tmp_path / year / "audio" / "track01.wav", seconds=3.0, frequency=frequency)
    store = tmp_path / "store"
    assert run_extraction(tmp_path / "2023" / "audio", store, config=config(tiny_model)).done == 1
    before = features_digests(store, "audio")

    with pytest.raises(DatasetMismatchError) as refused:
        run_extraction(tmp_path / "2024" / "audio", store, config=config(tiny_model))
    message = str(refused.value)
    assert str((tmp_path / "2023" / "audio").resolve()) in message
    assert str((tmp_path / "2024" / "audio").resolve()) in message
    assert "--dataset 2024-audio" in message and "Nothing was changed" in message
    assert features_digests(store, "audio") == before

    other = run_extraction(tmp_path / "2024" / "audio", store, dataset="2024-audio", config=config(tiny_model))
    assert other.done == 1
    assert features_digests(store, "audio") == before
    assert check_store(store).ok


def test_a_dataset_of_an_earlier_version_is_recorded_from_its_rows(tmp_path, tiny_model):
    """A store written before datasets were recorded: its rows tell its folder, so the protection holds too."""
    for year in ("2023", "2024"):
        write_audio(tmp_path / year / "audio" / "track01.wav", seconds=2.0)
    store = tmp_path / "store"
    run_extraction(tmp_path / "2023" / "audio", store, config=config(tiny_model))
    with sqlite3.connect(store / "manifest.sqlite") as db:
        db.execute("DELETE FROM datasets")
    with pytest.raises(DatasetMismatchError, match="holds the recordings of"):
        run_extraction(tmp_path / "2024" / "audio", store, config=config(tiny_model))
    again = run_extraction(tmp_path / "2023" / "audio", store, config=config(tiny_model))
    assert again.unchanged == 1 and again.done == 0


def test_the_cli_refuses_another_folder_with_exit_2(tmp_path, tiny_model, capsys, prefect_api):
    from cli.main import main

    for year in ("2023", "2024"):
        write_audio(tmp_path / year / "audio" / "track01.wav", seconds=2.0)
    store = tmp_path / "store"
    common = ["--store", str(store), "--model", tiny_model, "--device", "cpu", "--json"]
    assert main(["extract", str(tmp_path / "2023" / "audio"), *common]) == 0
    capsys.readouterr()
    assert main(["extract", str(tmp_path / "2024" / "audio"), *common]) == 2
    err = capsys.readouterr().err
    assert "mess-ai: error: dataset 'audio'" in err and "--dataset" in err


# --- one config per dataset ----------------------------------------------------------------------------------
def test_another_config_is_refused_unless_reextract_and_a_mix_is_seen_until_done(tmp_path, tiny_model):
    audio, store = tmp_path / "audio", tmp_path / "store"
    for name in ("a.wav", "b.wav", "c.wav"):
        write_audio(audio / name, seconds=6.0, frequency=300 + len(name) * 40 + ord(name[0]))
    first = run_extraction(audio, store, config=config(tiny_model))
    assert first.done == 3
    before = features_digests(store, "audio")
    wide = config(tiny_model, window=WindowSpec(window_seconds=4.0, hop_seconds=2.0))

    with pytest.raises(DatasetMismatchError) as refused:
        run_extraction(audio, store, config=wide)
    assert "window 5.0 s -> 4.0 s" in str(refused.value) and "--reextract" in str(refused.value)
    assert features_digests(store, "audio") == before  # nothing re-extracted behind the user's back

    # A re-extraction that cannot finish one file: b.wav's bytes are damaged for now.
    b = audio / "b.wav"
    b_bytes = b.read_bytes()
    b.write_bytes(b"not audio any more")
    partial = run_extraction(audio, store, config=wide, reextract=True)
    assert (partial.done, partial.failed) == (2, 1)
    b_id = next(s.track_id for s in discover_audio(audio) if s.relative == "b.wav")
    assert features_digests(store, "audio")[f"audio/segments/{b_id}.npy"] == before[f"audio/segments/{b_id}.npy"]
    report = check_store(store, "audio")
    assert [p.reason for p in report.problems if p.reason.startswith("mixed configs")], report.problems
    mix = next(p.reason for p in report.problems if p.reason.startswith("mixed configs"))
    assert "2 tracks with" in mix and "1 tracks with" in mix and "window 4.0 s" in mix and "window 5.0 s" in mix
    with pytest.raises(StoreError, match="cannot be read as one collection: mixed configs"):
        read_tracks(store, "audio")

    # The file is back: the next run with the dataset's (new) config finishes the re-extraction.
    b.write_bytes(b_bytes)
    finished = run_extraction(audio, store, config=wide)
    assert (finished.done, finished.unchanged) == (1, 2)
    assert check_store(store, "audio").ok
    assert len(read_tracks(store, "audio")[1]) == 3


def test_precision_auto_follows_the_dataset(tmp_path, tiny_model):
    """A dataset built in bf16 (on a GPU, say) is continued in bf16 by an `auto` CPU run: no re-extraction."""
    audio, store = tmp_path / "audio", tmp_path / "store"
    write_audio(audio / "a.wav", seconds=3.0)
    assert run_extraction(audio, store, config=config(tiny_model, precision="bf16")).done == 1
    write_audio(audio / "new.wav", seconds=3.0, frequency=660)
    auto = run_extraction(audio, store, config=config(tiny_model, precision="auto"))
    assert (auto.done, auto.unchanged) == (1, 1)
    fs = FeatureStore(store, "audio")
    try:
        assert fs.read_provenance()["precision"] == "bf16"
        assert len({r["config_key"] for r in fs.manifest.rows("audio")}) == 1
    finally:
        fs.close()
    with pytest.raises(DatasetMismatchError, match="precision bf16 -> fp32"):
        run_extraction(audio, store, config=config(tiny_model, precision="fp32"))


def test_a_worker_that_cannot_run_the_datasets_precision_refuses(tmp_path, tiny_model):
    """A device without bf16 autocast (torch's 'meta' device stands in for one): a clear refusal, nothing done."""
    import dataclasses

    import torch

    from mess_ai.errors import ModelError
    from mess_ai.features.loading import get_model

    audio, store = tmp_path / "audio", tmp_path / "store"
    write_audio(audio / "a.wav", seconds=3.0)
    assert run_extraction(audio, store, config=config(tiny_model, precision="bf16")).done == 1
    write_audio(audio / "new.wav", seconds=3.0, frequency=660)

    def on_a_device_without_bf16(*args, **kwargs):
        return dataclasses.replace(get_model(*args, **kwargs), device=torch.device("meta"))

    with pytest.raises(ModelError, match="cannot run bf16, the precision of dataset 'audio'.*--precision fp32"):
        run_extraction(audio, store, config=config(tiny_model), model_loader=on_a_device_without_bf16)
    assert [r["relative_path"] for r in rows(store, "audio").values()] == ["a.wav"]


# --- OS errors are transient; good features are never removed by a failed attempt ---------------------------
def test_a_read_denied_for_a_moment_is_retried_and_keeps_the_features(tmp_path, tiny_model, monkeypatch):
    """EACCES injected at the open (these tests run as root, where chmod does not bite)."""
    import mess_ai.extraction.steps as steps

    audio, store = tmp_path / "audio", tmp_path / "store"
    path = write_audio(audio / "song.wav", seconds=4.0)
    assert run_extraction(audio, store, config=config(tiny_model)).done == 1
    before = features_digests(store, "audio")
    write_audio(path, seconds=4.0, frequency=880)  # new bytes: the next run must read them

    real_open = steps.open_audio

    def denied(p, *args, **kwargs):
        if Path(p).name == "song.wav":
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(p))
        return real_open(p, *args, **kwargs)

    monkeypatch.setattr(steps, "open_audio", denied)
    failed = run_extraction(audio, store, config=config(tiny_model))
    outcome = failed.outcomes[0]
    assert outcome.status == "failed" and outcome.permanent is False
    assert outcome.error_class == "PermissionError" and "decode" not in outcome.reason
    assert features_digests(store, "audio") == before
    assert check_store(store).ok  # the kept features are not orphans

    monkeypatch.setattr(steps, "open_audio", real_open)
    again = run_extraction(audio, store, config=config(tiny_model))
    assert again.done == 1 and features_digests(store, "audio") != before


def _extract_changing_b_after_validation(tmp_path, model, change) -> dict[str, dict]:
    """Extract a.wav and b.wav; ``change(b)`` runs between the header check and the decoding, and the decoding
    must end within 60 s. Returns the manifest rows by relative path."""
    audio, store = tmp_path / "audio", tmp_path / "store"
    write_audio(audio / "a.wav", seconds=3.0)
    b = write_audio(audio / "b.wav", seconds=3.0, frequency=500)
    session = ExtractionSession(store, "audio", config(model))
    try:
        valid = session.validate(session.plan(session.discover(audio)))
        change(b)
        worker = threading.Thread(target=lambda: session.extract(list(session.preprocess(valid))), daemon=True)
        worker.start()
        worker.join(60)
        assert not worker.is_alive(), "preprocessing blocked"
    finally:
        session.close()
    return {r["relative_path"]: r for r in rows(store, "audio").values()}


def test_a_file_removed_mid_run_is_a_transient_failure(tmp_path, tiny_model):
    found = _extract_changing_b_after_validation(tmp_path, tiny_model, Path.unlink)  # ENOENT at the open
    assert found["a.wav"]["status"] == DONE
    assert found["b.wav"]["status"] == FAILED and not found["b.wav"]["permanent"]
    assert found["b.wav"]["error_class"] == "FileNotFoundError"


def test_a_fifo_swapped_in_after_discovery_fails_at_once(tmp_path, tiny_model):
    """Never opened the blocking way, never waited on: the run ends in seconds, its lock released."""
    def swap_for_a_fifo(path: Path) -> None:
        path.unlink()
        os.mkfifo(path)

    started = time.perf_counter()
    found = _extract_changing_b_after_validation(tmp_path, tiny_model, swap_for_a_fifo)
    assert time.perf_counter() - started < 30
    assert found["a.wav"]["status"] == DONE
    assert found["b.wav"]["status"] == FAILED and "not a regular file (a FIFO)" in found["b.wav"]["error_message"]
    fs = FeatureStore(tmp_path / "store", "audio")
    try:
        assert not fs.lock(found["b.wav"]["track_id"]).held_elsewhere()
    finally:
        fs.close()


# --- header limits -------------------------------------------------------------------------------------------
def _patch_wav_rate(path: Path, rate: int) -> None:
    """Rewrite a PCM WAV header's sampling rate (and byte rate) in place: the decode bomb of the issue."""
    data = bytearray(path.read_bytes())
    fmt = data.index(b"fmt ")
    channels = int.from_bytes(data[fmt + 10:fmt + 12], "little")
    bits = int.from_bytes(data[fmt + 22:fmt + 24], "little")
    data[fmt + 12:fmt + 16] = rate.to_bytes(4, "little")
    data[fmt + 16:fmt + 20] = (rate * channels * bits // 8).to_bytes(4, "little")
    path.write_bytes(bytes(data))


def test_a_decode_bomb_fails_before_decoding(tmp_path, tiny_model):
    """72 KB whose header says 1 Hz: 10 hours once resampled. Failed, permanent, with the numbers; the run goes on."""
    audio, store = tmp_path / "audio", tmp_path / "store"
    bomb = write_audio(audio / "bomb.wav", seconds=1.5, sample_rate=24000)  # 36,000 16-bit samples: ~72 KB
    _patch_wav_rate(bomb, 1)
    write_audio(audio / "good.wav", seconds=3.0)
    summary = run_extraction(audio, store, config=config(tiny_model))
    failed = {o.relative_path: o for o in summary.failures}
    assert summary.done == 1 and set(failed) == {"bomb.wav"}
    assert failed["bomb.wav"].stage == "validate" and failed["bomb.wav"].permanent
    assert "1 Hz" in failed["bomb.wav"].reason and "4000" in failed["bomb.wav"].reason
    assert summary.resources["peak_rss_mb"] < 3000  # a decoded bomb would take 4 GB and more


# --- poison files --------------------------------------------------------------------------------------------
def _kill_while_attempting(audio: Path, store: Path, model: str, relative: str, timeout: float = 120) -> None:
    """Start an extraction process and SIGKILL it as soon as it has begun an attempt on ``relative``."""
    before = {r["relative_path"]: r for r in rows(store, "audio").values()}.get(relative) if (
        store / "manifest.sqlite").exists() else None
    begun_before = (before or {}).get("unfinished") or 0
    proc = extract_process.start(audio, store, model)
    manifest = None
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise AssertionError(f"the run ended before it was killed:\n{proc.stderr.read()[-2000:]}")
            if (store / "manifest.sqlite").exists():
                manifest = manifest or Manifest(sqlite_url(str(store / "manifest.sqlite")))
                row = next((r for r in manifest.rows("audio") if r["relative_path"] == relative), None)
                if row is not None and row["status"] == PENDING and (row["unfinished"] or 0) > begun_before:
                    proc.send_signal(signal.SIGKILL)
                    proc.wait(30)
                    return
            time.sleep(0.005)
        raise AssertionError(f"{relative} was never attempted")
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
        if manifest is not None:
            manifest.close()


def test_a_file_the_process_dies_on_is_given_up_and_spares_its_neighbours(tmp_path, tiny_model):
    """The process dies (SIGKILL, as the kernel's OOM killer does) each time `a_poison.wav` is attempted: after
    three such deaths it is failed for good, and the files in flight beside it the first time are not."""
    audio, store = tmp_path / "audio", tmp_path / "store"
    write_audio(audio / "a_poison.wav", seconds=60.0)
    for index in range(3):
        write_audio(audio / f"b_good{index}.wav", seconds=4.0, frequency=300 + 100 * index)
    for _ in range(UNFINISHED_BEFORE_GIVING_UP):
        _kill_while_attempting(audio, store, tiny_model, "a_poison.wav")
    found = {r["relative_path"]: r for r in rows(store, "audio").values()}
    assert found["a_poison.wav"]["unfinished"] == UNFINISHED_BEFORE_GIVING_UP

    summary = extract_process.run(audio, store, tiny_model, timeout=180)
    outcomes = {o["relative_path"]: o for o in summary["outcomes"]}
    poison = outcomes["a_poison.wav"]
    assert poison["status"] == "failed" and poison["permanent"]
    assert f"ended {UNFINISHED_BEFORE_GIVING_UP} times" in poison["reason"]
    assert all(outcomes[f"b_good{i}.wav"]["status"] == "done" for i in range(3))
    # Failed for good: the next run does not try it again (its bytes did not change).
    later = run_extraction(audio, store, config=config(tiny_model))
    assert {o.relative_path: o.status for o in later.outcomes}["a_poison.wav"] == "previously_failed"


def test_a_run_stopped_in_order_does_not_count_as_a_death(tmp_path, tiny_model):
    """Files given back by a run that stops (an error, a closed generator) keep no unfinished attempt."""
    audio, store = tmp_path / "audio", tmp_path / "store"
    for index in range(3):
        write_audio(audio / f"{index}.wav", seconds=3.0, frequency=300 + 100 * index)
    session = ExtractionSession(store, "audio", config(tiny_model))
    try:
        jobs = session.preprocess(session.validate(session.plan(session.discover(audio))))
        first = next(jobs)
        session.abandon(first)
        jobs.close()
    finally:
        session.close()
    found = rows(store, "audio")
    assert [r["status"] for r in found.values()] == [PENDING]
    assert [r["unfinished"] for r in found.values()] == [0]
    assert run_extraction(audio, store, config=config(tiny_model)).done == 3


# --- memory in the flow --------------------------------------------------------------------------------------
def test_chunks_are_bounded_by_audio_seconds_not_file_count(tmp_path):
    """32 three-hour files held ~33 GB with two chunks of 16 in flight; with the flow's default minutes per task
    each is a chunk of its own, and short files fill a chunk up to an hour."""
    import inspect

    from flows.extract import extract_features

    minutes = inspect.signature(extract_features.fn).parameters["run"].default.minutes_per_task
    assert minutes == 60.0
    long_files = [type("S", (), {"track_id": f"l{i}"})() for i in range(32)]
    chunks = chunk_sources(long_files, 16, minutes * 60, {f"l{i}": 3 * 3600.0 for i in range(32)})
    assert [len(c) for c in chunks] == [1] * 32
    short = [type("S", (), {"track_id": f"s{i}"})() for i in range(100)]
    durations = {f"s{i}": 240.0 for i in range(100)}
    chunks = chunk_sources(short, 16, minutes * 60, durations)
    assert max(sum(durations[s.track_id] for s in c) for c in chunks) <= 3600
    # Decoded audio in flight (two chunks, float32 at 24 kHz) stays under a GB whatever the file count.
    assert 2 * 3600 * 24000 * 4 < 1 << 30


# --- the manifest of an earlier version ------------------------------------------------------------------------
def test_a_manifest_of_an_earlier_version_gets_the_new_columns(tmp_path):
    path = tmp_path / "manifest.sqlite"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE tracks (dataset VARCHAR(200) NOT NULL, track_id VARCHAR(200) NOT NULL, "
                   "source_path TEXT NOT NULL, relative_path TEXT NOT NULL, size BIGINT, mtime_ns BIGINT, "
                   "sha256 VARCHAR(64), config_key VARCHAR(64), status VARCHAR(16) NOT NULL, "
                   "failure_stage VARCHAR(32), error_class VARCHAR(100), error_message TEXT, permanent BOOLEAN, "
                   "attempts INTEGER NOT NULL, first_attempt_at DATETIME, last_attempt_at DATETIME, "
                   "duration_seconds FLOAT, n_windows INTEGER, seconds_spent FLOAT, "
                   "PRIMARY KEY (dataset, track_id))")
        db.execute("INSERT INTO tracks (dataset, track_id, source_path, relative_path, config_key, status, "
                   "attempts, n_windows) VALUES ('ds', 't1', '/a/x.wav', 'x.wav', 'k1', 'done', 1, 4)")
    manifest = Manifest(sqlite_url(str(path)))
    try:
        row = manifest.get("ds", "t1")
        assert (row["features_config_key"], row["features_n_windows"], row["unfinished"]) == ("k1", 4, None)
        assert manifest.feature_configs("ds") == {"k1": 1}
    finally:
        manifest.close()
