"""The store's disk full (ENOSPC): a clear error per file, no partial file, the manifest consistent, and a re-run
completes once there is room again.

Two ways to fill the disk: ENOSPC injected into the atomic writer (runs everywhere), and a real, tiny tmpfs
mounted under the test's folder (needs root; skipped where ``mount`` is not allowed).
"""

from __future__ import annotations

import errno
import io
import json
import os
import sqlite3
import subprocess

import numpy as np
import pytest
import sqlalchemy.exc

import mess_ai.store.atomic
from mess_ai.audio import discover_audio
from mess_ai.config import ExtractConfig
from mess_ai.pipeline import ExtractionSession, run_extraction
from mess_ai.store import FeatureStore, Manifest
from tests.helpers import extract_process
from tests.helpers.audio import write_audio
from tests.helpers.store_checks import assert_complete, assert_consistent_after_crash, rows, temp_files

NO_SPACE = "No space left on device"


def _config(model, **kwargs):
    return ExtractConfig(model=model, device="cpu", **kwargs)


def _audio(folder, n=4, seconds=3.0):
    for i in range(n):
        write_audio(folder / f"t{i}.wav", seconds=seconds, seed=i)
    return folder


def _assert_disk_full_recorded(summary, store, manifest_url=None):
    """Files that did not fit failed at write with the OS's words, retryable; nothing partial is left."""
    failed = [o for o in summary.outcomes if o.status == "failed"]
    assert failed, "the disk never filled up"
    for outcome in failed:
        assert (outcome.stage, outcome.error_class, outcome.permanent) == ("write", "OSError", False), outcome
        assert NO_SPACE in outcome.reason
        fs = FeatureStore(store, "audio", manifest_url)
        for scale in ("segments", "aggregated", "raw"):
            assert not fs.path(scale, outcome.track_id).exists(), (outcome.relative_path, scale)
        fs.close()
    assert summary.integrity_problems == []
    assert not temp_files(store)


def test_injected_enospc_mid_write(tmp_path, tiny_model, monkeypatch):
    audio = _audio(tmp_path / "audio")
    real_save = np.save
    calls = []

    def save_until_full(fh, array, allow_pickle):
        # The 4th array written (t1's aggregated, after its segments went in place) hits a full disk half-way,
        # and so does every one after it.
        calls.append(fh.name if hasattr(fh, "name") else "?")
        if len(calls) < 4:
            return real_save(fh, array, allow_pickle=allow_pickle)
        buffer = io.BytesIO()
        real_save(buffer, array, allow_pickle=allow_pickle)
        fh.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(mess_ai.store.atomic.np, "save", save_until_full)
    summary = run_extraction(audio, tmp_path / "store", config=_config(tiny_model))
    monkeypatch.undo()
    assert [o.status for o in summary.outcomes] == ["done", "failed", "failed", "failed"]
    _assert_disk_full_recorded(summary, tmp_path / "store")
    assert_consistent_after_crash(tmp_path / "store", "audio", audio)

    again = run_extraction(audio, tmp_path / "store", config=_config(tiny_model))
    assert (again.done, again.unchanged, again.failed) == (3, 1, 0)
    assert_complete(tmp_path / "store", "audio", audio)
    assert all(r["attempts"] == (1 if r["relative_path"] == "t0.wav" else 2)
               for r in rows(tmp_path / "store", "audio").values())


# --- a real full disk: a tiny tmpfs ---------------------------------------------------------------------------

@pytest.fixture
def tiny_disk(tmp_path):
    """A 4 MiB tmpfs at ``tmp_path / 'disk'``; ``fill(free_bytes)`` leaves about that much room, ``free()`` gives
    the room back."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    filler = disk / "filler"

    class Disk:
        path = disk

        @staticmethod
        def fill(free_bytes):
            stat = os.statvfs(disk)
            with open(filler, "wb") as fh:
                fh.write(bytes(max(0, stat.f_bavail * stat.f_frsize - free_bytes)))

        @staticmethod
        def free():
            filler.unlink()

    try:
        yield Disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_features_on_a_full_disk(tmp_path, tiny_model, tiny_disk):
    audio = _audio(tmp_path / "audio", n=6)
    store = tiny_disk.path / "store"
    manifest = f"sqlite:///{tmp_path / 'manifest.sqlite'}"
    FeatureStore(store, "audio", manifest).close()
    tiny_disk.fill(free_bytes=24 << 10)  # provenance and a couple of tracks, 4 KiB pages each
    summary = run_extraction(audio, store, config=_config(tiny_model), manifest_url=manifest)
    assert summary.done >= 1
    _assert_disk_full_recorded(summary, store, manifest)
    tiny_disk.free()
    again = run_extraction(audio, store, config=_config(tiny_model), manifest_url=manifest)
    assert again.done == summary.failed and again.failed == 0


def test_raw_features_on_a_full_disk(tmp_path, tiny_model, tiny_disk):
    audio = _audio(tmp_path / "audio", n=4, seconds=20.0)
    store = tiny_disk.path / "store"
    manifest = f"sqlite:///{tmp_path / 'manifest.sqlite'}"
    FeatureStore(store, "audio", manifest).close()
    tiny_disk.fill(free_bytes=400 << 10)  # less than the raw file of one track (about 500 KiB)
    command = extract_process.command(audio, store, tiny_model, keep_raw=True, manifest_url=manifest)
    proc = subprocess.run(command, cwd=extract_process.REPO, env=extract_process.environment(), capture_output=True,
                          text=True, timeout=300)
    # The raw file's blocks are reserved before it is mapped: a full disk is an ENOSPC the run records, not a
    # SIGBUS that kills the process.
    assert proc.returncode == 1, f"the run died (exit {proc.returncode}): {proc.stderr[-2000:]}"
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    failed = [o for o in summary["outcomes"] if o["status"] == "failed"]
    # Raw windows are written while the model runs, so a raw file that does not fit fails at stage extract.
    assert failed and all(NO_SPACE in o["reason"] and o["stage"] in ("extract", "write") and not o["permanent"]
                          for o in failed)
    assert_consistent_after_crash(store, "audio", audio, manifest)
    assert not temp_files(store)
    tiny_disk.free()
    again = run_extraction(audio, store, config=_config(tiny_model, keep_raw=True), manifest_url=manifest)
    assert again.done == len(failed) and again.failed == 0
    assert_complete(store, "audio", audio, keep_raw=True, manifest_url=manifest)


# With 32 KiB left the provenance file is what no longer fits; with 64 KiB, a manifest update.
FREE_KIB = pytest.mark.parametrize("free_kib", [32, 64])


def _run_with_manifest_on_full_disk(tmp_path, tiny_model, tiny_disk, free_kib):
    """A run in a process of its own (see test_failed_run_releases_its_track_locks for why) on a store whose
    manifest shares the full disk; returns the folders and the process's exit code and log."""
    audio = _audio(tmp_path / "audio", n=6)
    store = tiny_disk.path / "store"
    FeatureStore(store, "audio").close()
    tiny_disk.fill(free_bytes=free_kib << 10)
    proc = subprocess.run(extract_process.command(audio, store, tiny_model), cwd=extract_process.REPO,
                          env=extract_process.environment(), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and not proc.stdout.strip(), "the run did not stop on the full disk"
    return audio, store, proc


@FREE_KIB
def test_store_and_manifest_on_a_full_disk_stay_consistent(tmp_path, tiny_model, tiny_disk, free_kib):
    audio, store, proc = _run_with_manifest_on_full_disk(tmp_path, tiny_model, tiny_disk, free_kib)
    assert proc.returncode == 1, f"the run died of signal {-proc.returncode}"
    counts = assert_consistent_after_crash(store, "audio", audio)
    assert not temp_files(store)
    tiny_disk.free()
    again = run_extraction(audio, store, config=_config(tiny_model))
    assert again.done == 6 - counts["done"] and again.failed == 0
    assert_complete(store, "audio", audio)


@FREE_KIB
def test_store_and_manifest_on_a_full_disk_is_a_clear_error(tmp_path, tiny_model, tiny_disk, free_kib):
    _, _, proc = _run_with_manifest_on_full_disk(tmp_path, tiny_model, tiny_disk, free_kib)
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("mess_ai.errors.StoreError: "), last


def test_failed_run_releases_its_track_locks(tmp_path, tiny_model, monkeypatch):
    audio = _audio(tmp_path / "audio", n=4)

    def manifest_full(self, *args, **kwargs):
        raise sqlalchemy.exc.OperationalError("UPDATE tracks", {}, sqlite3.OperationalError("database or disk is full"))

    monkeypatch.setattr(Manifest, "mark_done_many", manifest_full)
    with pytest.raises(sqlalchemy.exc.OperationalError):  # as raised by the stand-in: the run stops on it
        run_extraction(audio, tmp_path / "store", config=_config(tiny_model))
    monkeypatch.undo()
    fs = FeatureStore(tmp_path / "store", "audio")
    try:
        for source in discover_audio(audio):
            lock = fs.lock(source.track_id)
            lock.acquire()  # TrackBusyError: still held by the run that failed
            lock.release()
    finally:
        fs.close()


def test_failed_chunk_of_the_flow_releases_its_track_locks(tmp_path, tiny_model, monkeypatch):
    """The flow's way: a chunk prepared as a list, then extracted; an error on the first track gives back the
    tracks of the whole list, the ones not reached yet too."""
    audio = _audio(tmp_path / "audio", n=4)

    def manifest_full(self, *args, **kwargs):
        raise sqlalchemy.exc.OperationalError("UPDATE tracks", {}, sqlite3.OperationalError("database or disk is full"))

    session = ExtractionSession(tmp_path / "store", "audio", _config(tiny_model, batch_size=1))
    try:
        jobs = list(session.preprocess(session.validate(session.plan(session.discover(audio)))))
        assert len(jobs) == 4
        monkeypatch.setattr(Manifest, "mark_done_many", manifest_full)
        with pytest.raises(sqlalchemy.exc.OperationalError):
            session.extract(jobs)
        monkeypatch.undo()
        for source in discover_audio(audio):
            lock = session.store.lock(source.track_id)
            lock.acquire()  # TrackBusyError: still held by the chunk that failed
            lock.release()
    finally:
        session.close()
