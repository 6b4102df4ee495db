"""The store's reader on a store the real pipeline wrote: ids, matrices per scale and layer, and window times by the
rule the windows were cut with, also for rows written before the sample count was recorded."""

from __future__ import annotations

import contextlib
import json
import shutil
import sqlite3

import numpy as np
import pytest

from mess_ai.audio import WindowSpec, window_bounds
from mess_ai.errors import StoreError
from mess_ai.store.reader import open_store
from tests.helpers.windowed import DATASET, DURATIONS, TOO_SHORT, done_rows, windowed_store


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_model):
    return windowed_store(tmp_path_factory.mktemp("reader"), tiny_model)


def _npy(store, scale, track_id):
    return np.load(store / DATASET / scale / f"{track_id}.npy", allow_pickle=False)


def test_ids_and_matrices_are_the_stored_files(store):
    reader = open_store(store)  # the store's only dataset
    rows = done_rows(store)
    assert reader.dataset == DATASET and reader.track_ids == [r["track_id"] for r in rows]
    assert sorted(t.relative_path for t in reader.tracks) == sorted(DURATIONS)  # the failed file is left out
    assert TOO_SHORT not in {t.relative_path for t in reader.tracks}
    stored = np.stack([_npy(store, "aggregated", track_id) for track_id in reader.track_ids])
    assert stored.shape == (len(DURATIONS), reader.n_states, reader.hidden_size) == (5, 3, 32)
    np.testing.assert_array_equal(reader.aggregated("all"), stored)
    np.testing.assert_array_equal(reader.aggregated(1), stored[:, 1])
    np.testing.assert_allclose(reader.aggregated("mean"), stored.mean(axis=1), rtol=1e-6)
    last_two = reader.track_ids[-2:]
    np.testing.assert_array_equal(reader.aggregated(-1, last_two), stored[-2:, 2])
    for track_id in reader.track_ids:
        segments = _npy(store, "segments", track_id)
        assert segments.dtype == np.float32 and segments.shape[0] == reader.track(track_id).n_windows
        np.testing.assert_array_equal(reader.segments(track_id), segments)
        np.testing.assert_array_equal(reader.segments(track_id, 2), segments[:, 2])
    assert reader.provenance["model"] and reader.provenance["sampling_rate"] == reader.sampling_rate == 24000


def test_window_times_follow_the_windowing_rule_and_end_at_the_duration(store):
    reader = open_store(store, DATASET)
    spec = WindowSpec(5.0, 2.5, 1.0)
    assert reader.window_spec == spec
    kinds = set()
    for track in reader.tracks:
        # The sample count is recorded at extraction, and is the decoded length the duration was computed from.
        assert isinstance(track.n_samples, int) and track.n_samples == round(track.duration_seconds * 24000)
        times = reader.window_times(track.track_id)
        bounds = window_bounds(track.n_samples, 24000, spec)
        expected = np.array([[start / 24000, (start + length) / 24000] for start, length in bounds])
        np.testing.assert_array_equal(times, expected)
        assert times.dtype == np.float64 and len(times) == track.n_windows == len(reader.segments(track.track_id))
        assert times[-1, 1] == track.duration_seconds
        assert abs(track.duration_seconds - DURATIONS[track.relative_path]) < 0.01
        if len(times) > 1:
            hops = np.diff(times[:, 0])
            kinds.add("tail" if hops[-1] < 2.5 else "on the hop")
            np.testing.assert_allclose(hops[:-1], 2.5)
        else:
            kinds.add("short" if times[0, 1] < 5.0 else "one window")
    assert kinds == {"short", "one window", "tail", "on the hop"}


def test_rows_written_before_the_sample_count_give_the_same_times(store, tmp_path):
    before = open_store(store)
    old = tmp_path / "old-store"
    shutil.copytree(store, old)
    with contextlib.closing(sqlite3.connect(old / "manifest.sqlite")) as conn:
        conn.execute("UPDATE tracks SET n_samples = NULL")
        conn.commit()
    reader = open_store(old)
    assert all(track.n_samples is None for track in reader.tracks)
    for track_id in reader.track_ids:
        np.testing.assert_array_equal(reader.window_times(track_id), before.window_times(track_id))


def test_times_that_do_not_match_the_features_are_refused(store, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(store, copy)
    track = next(t for t in open_store(copy).tracks if t.relative_path == "long/tail2.wav")
    with contextlib.closing(sqlite3.connect(copy / "manifest.sqlite")) as conn:
        conn.execute("UPDATE tracks SET n_samples = ? WHERE track_id = ?", (24000 * 8, track.track_id))
        conn.commit()
    with pytest.raises(StoreError, match=r"window times of long/tail2.wav .* do not match its features: 192000 "
                                         r"samples at 24000 Hz .* give 3 windows, but .* holds 4 and the manifest records 4"):
        open_store(copy).window_times(track.track_id)
    provenance = copy / DATASET / "provenance.json"
    provenance.write_text(json.dumps({k: v for k, v in json.loads(provenance.read_text()).items()
                                      if k != "hop_seconds"}))
    with pytest.raises(StoreError, match="records no hop_seconds"):
        open_store(copy).window_times(track.track_id)


def test_unknown_tracks_datasets_and_layers_are_named(store, tmp_path):
    reader = open_store(store)
    with pytest.raises(KeyError, match="'nope' is not a done track of dataset 'windowed'"):
        reader.segments("nope")
    with pytest.raises(ValueError, match="layer 3 is out of range: the features have 3 hidden states"):
        reader.aggregated(3)
    with pytest.raises(ValueError, match="layer must be an integer hidden-state index, 'mean' or 'all'; got 'last'"):
        reader.segments(reader.track_ids[0], "last")
    with pytest.raises(FileNotFoundError, match="dataset 'other' does not exist in store"):
        open_store(store, "other")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        open_store(tmp_path / "nowhere")
