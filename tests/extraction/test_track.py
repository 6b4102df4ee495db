"""A track's attempt: the lock, the claim and the manifest's attempt record are taken and given back by
``TrackAttempt`` alone, on success, on failure, on an exception and on an orderly give-back."""

from __future__ import annotations

import numpy as np
import pytest
from sqlalchemy import event, select

from mess_ai.audio import discover_audio
from mess_ai.audio.opening import open_audio
from mess_ai.deadline import StageTimeout
from mess_ai.errors import InputError
from mess_ai.extraction.track import UNFINISHED_BEFORE_GIVING_UP, TrackAttempt, fail_stuck, settle_done
from mess_ai.store import DONE, FAILED, PENDING, FeatureStore, Manifest, atomic_save_npy
from mess_ai.store.manifest import claims
from tests.helpers.audio import write_audio

KEY = "key-of-this-run"


@pytest.fixture
def store(tmp_path):
    store = FeatureStore(tmp_path / "store", "ds")
    yield store
    store.close()


@pytest.fixture
def source(tmp_path):
    write_audio(tmp_path / "audio" / "song.wav", seconds=1.0)
    return discover_audio(tmp_path / "audio")[0]


def begun(store, source) -> TrackAttempt:
    """The track taken and its attempt recorded, with the hash of its bytes."""
    track = TrackAttempt.take(store, source, KEY)
    with open_audio(source.path) as opened:
        assert track.begin(opened) is None
    return track


def is_free(store, source) -> bool:
    other = TrackAttempt.take(store, source, KEY, wait=False)
    if other is None:
        return False
    other.give_back()
    return True


def row(store, source) -> dict:
    return store.manifest.get(store.dataset, source.track_id)


def test_a_track_held_is_busy_for_everyone_else(store, source):
    with begun(store, source):
        assert row(store, source)["status"] == PENDING and row(store, source)["unfinished"] == 1
        assert not is_free(store, source)
    assert is_free(store, source)


def test_done_records_the_outcome_and_releases(store, source):
    with begun(store, source) as track:
        track.duration_seconds = 1.0
        outcome = track.done(n_windows=1)
        assert is_free(store, source)  # given back at once, before the block ends
    found = row(store, source)
    assert (found["status"], found["unfinished"], found["attempts"], found["n_windows"]) == (DONE, 0, 1, 1)
    assert (outcome.status, outcome.attempts, outcome.duration_seconds) == ("done", 1, 1.0)


def test_tracks_finished_together_are_settled_in_one_manifest_transaction(store, tmp_path):
    for i in range(4):
        write_audio(tmp_path / "many" / f"t{i}.wav", seconds=1.0, frequency=300 + 50 * i)
    sources = discover_audio(tmp_path / "many")
    tracks = [begun(store, source) for source in sources]
    for track in tracks:
        track.duration_seconds = 1.0
    with store.manifest.engine.connect() as conn:  # each track holds its claim in the manifest
        assert len(conn.execute(select(claims)).all()) == 4
    commits = []

    def committed(conn) -> None:
        commits.append(conn)

    event.listen(store.manifest.engine, "commit", committed)
    try:
        outcomes = settle_done([(track, 2) for track in tracks])
    finally:
        event.remove(store.manifest.engine, "commit", committed)
    assert len(commits) == 1  # one write for the four tracks, not two per track (done, then the claim)
    assert [o.status for o in outcomes] == ["done"] * 4
    assert all(row(store, s)["status"] == DONE and row(store, s)["n_windows"] == 2 for s in sources)
    with store.manifest.engine.connect() as conn:
        assert conn.execute(select(claims)).all() == []
    assert all(is_free(store, source) for source in sources)


def test_tracks_settled_together_are_all_given_back_when_the_manifest_write_fails(store, tmp_path, monkeypatch):
    for i in range(3):
        write_audio(tmp_path / "many" / f"t{i}.wav", seconds=1.0, frequency=300 + 50 * i)
    sources = discover_audio(tmp_path / "many")
    tracks = [begun(store, source) for source in sources]

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Manifest, "mark_done_many", disk_full)
    with pytest.raises(OSError):
        settle_done([(track, 1) for track in tracks])
    monkeypatch.undo()
    assert all(is_free(store, source) for source in sources)  # every lock released, every claim deleted
    assert all((row(store, s)["status"], row(store, s)["unfinished"]) == (PENDING, 1) for s in sources)


def test_failed_records_the_reason_and_releases(store, source):
    with begun(store, source) as track:
        outcome = track.failed("preprocess", InputError(source.path, "not audio", "preprocess"))
    found = row(store, source)
    assert (found["status"], found["failure_stage"], found["error_message"], found["permanent"]) == \
        (FAILED, "preprocess", "not audio", True)
    assert found["unfinished"] == 0 and is_free(store, source)
    assert (outcome.status, outcome.reason, outcome.permanent) == ("failed", "not audio", True)
    transient = begun(store, source).failed("write", OSError(28, "No space left on device"))
    assert transient.permanent is False and row(store, source)["attempts"] == 2 and is_free(store, source)


def test_an_exception_gives_the_track_back_in_order(store, source):
    with pytest.raises(RuntimeError):
        with begun(store, source):
            raise RuntimeError("the run stops")
    found = row(store, source)
    assert (found["status"], found["unfinished"]) == (PENDING, 0)  # redone next run, not counted as a death
    assert is_free(store, source)


def test_a_handed_over_track_stays_held_until_its_holder_gives_it_back(store, source):
    with begun(store, source) as track:
        track.hand_over()
    assert not is_free(store, source) and row(store, source)["unfinished"] == 1
    track.give_back()
    track.give_back()  # once only
    assert is_free(store, source) and row(store, source)["unfinished"] == 0
    with pytest.raises(RuntimeError):
        with begun(store, source) as track:
            track.hand_over()
            raise RuntimeError("stopped before the job left")
    assert is_free(store, source)


def test_a_block_left_before_an_attempt_began_records_nothing(store, source):
    with TrackAttempt.take(store, source, KEY):
        pass
    assert row(store, source) is None and is_free(store, source)


def test_an_outcome_that_cannot_be_written_still_releases_but_counts_as_unfinished(store, source, monkeypatch):
    def manifest_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    with begun(store, source) as track:
        monkeypatch.setattr(Manifest, "mark_done_many", manifest_full)
        with pytest.raises(OSError):
            track.done(n_windows=1)
        monkeypatch.undo()
    assert is_free(store, source)
    assert (row(store, source)["status"], row(store, source)["unfinished"]) == (PENDING, 1)


def test_attempts_the_process_died_in_give_up_on_the_file(store, source):
    for _ in range(UNFINISHED_BEFORE_GIVING_UP):
        begun(store, source).lock.release()  # the process dies: no outcome, no end of the attempt
    track = TrackAttempt.take(store, source, KEY)
    with track, open_audio(source.path) as opened:
        error = track.begin(opened)
    assert isinstance(error, InputError) and f"ended {UNFINISHED_BEFORE_GIVING_UP} times" in error.reason
    assert is_free(store, source)


def test_a_failed_attempt_discards_its_unfinished_raw_file_and_keeps_the_earlier_one(store, source):
    earlier = np.ones((2, 3, 4, 5), dtype=np.float16)
    atomic_save_npy(store.path("raw", source.track_id), earlier)
    with begun(store, source) as track:
        track.write_raw_window(0, np.zeros((3, 4, 5), dtype=np.float16), n_windows=2)
        assert store.temp_files(source.track_id)
        track.failed("extract", RuntimeError("out of memory"))
    assert np.array_equal(np.load(store.path("raw", source.track_id), allow_pickle=False), earlier)
    assert not store.temp_files(source.track_id)


def test_a_track_given_back_discards_its_raw_file_and_a_done_one_puts_it_in_place(store, source):
    with begun(store, source) as track:
        track.write_raw_window(0, np.zeros((3, 4, 5), dtype=np.float16), n_windows=1)
    assert not store.path("raw", source.track_id).exists() and not store.temp_files(source.track_id)
    with begun(store, source) as track:
        track.write_raw_window(0, np.full((3, 4, 5), 2, dtype=np.float16), n_windows=1)
        track.complete_files()
        track.done(n_windows=1)
    assert np.load(store.path("raw", source.track_id), allow_pickle=False).shape == (1, 3, 4, 5)


def test_a_stuck_attempt_is_failed_and_its_lock_left_to_the_stuck_thread(store, source):
    stuck = begun(store, source)  # held by a thread that never returns
    timeout = StageTimeout("chunk 1 of 1", 10, "reading and decoding song.wav", source.track_id, "preprocess")
    outcome = fail_stuck(store, source, KEY, timeout)
    assert (outcome.status, outcome.error_class, outcome.attempts, outcome.permanent) == \
        ("failed", "StageTimeout", 1, False)
    assert row(store, source)["status"] == FAILED and not is_free(store, source)
    stuck.lock.release()
