"""``FeatureStore.outputs_valid``: the size check that lets a run skip a done track without reading its files."""

from __future__ import annotations

import io

import numpy as np
import pytest

import mess_ai.store.layout
from mess_ai.store import ExpectedShapes, FeatureStore

SHAPES = ExpectedShapes(n_windows=3, n_states=4, hidden=8)


@pytest.fixture
def store(tmp_path):
    store = FeatureStore(tmp_path / "store", "ds")
    store.write_segments("t", np.ones(SHAPES.segments, np.float32), np.ones(SHAPES.aggregated, np.float32))
    yield store
    store.close()


def test_files_of_the_expected_size_pass_without_their_headers_being_read(store, monkeypatch):
    def no_header(path):
        raise AssertionError(f"read the header of {path}")

    monkeypatch.setattr(mess_ai.store.layout, "read_npy_header", no_header)
    assert store.outputs_valid("t", SHAPES, keep_raw=False)
    # Another window count is another size: not valid (its header, when read, says so too).
    monkeypatch.undo()
    assert not store.outputs_valid("t", ExpectedShapes(4, 4, 8), keep_raw=False)


@pytest.mark.parametrize("damage", ["truncated", "missing", "grown", "other_dtype"])
def test_a_missing_truncated_or_different_file_never_passes(store, damage):
    segments = store.path("segments", "t")
    if damage == "truncated":
        with open(segments, "r+b") as fh:
            fh.truncate(segments.stat().st_size - 4)
    elif damage == "missing":
        store.path("aggregated", "t").unlink()
    elif damage == "grown":
        with open(segments, "ab") as fh:
            fh.write(b"\0" * 4)
    else:
        np.save(segments, np.ones(SHAPES.segments, np.float64), allow_pickle=False)
    assert not store.outputs_valid("t", SHAPES, keep_raw=False)


def test_a_file_whose_header_numpy_wrote_at_another_length_is_judged_by_its_header(store):
    # Format 2.0 (what another numpy may write) has a longer header: the size differs, the header is read.
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, np.ones(SHAPES.segments, np.float32), version=(2, 0))
    store.path("segments", "t").write_bytes(buffer.getvalue())
    assert store.outputs_valid("t", SHAPES, keep_raw=False)
    assert not store.outputs_valid("t", ExpectedShapes(2, 4, 8), keep_raw=False)
