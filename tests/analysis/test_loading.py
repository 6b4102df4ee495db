"""Reading a dataset's embeddings from the store: which dataset, which layer, and refusing broken inputs."""

from __future__ import annotations

import numpy as np
import pytest

from mess_ai.analysis.labels import folder_labels, read_labels_csv
from mess_ai.analysis.loading import TrackInfo, load_dataset_features, match_track, resolve_dataset
from mess_ai.errors import StoreError
from mess_ai.store.atomic import atomic_save_npy
from tests.helpers.embeddings import write_store


def _features(n, n_states=3, hidden=8, seed=0):
    return np.random.default_rng(seed).standard_normal((n, n_states, hidden)).astype(np.float32)


@pytest.fixture
def store(tmp_path):
    features = _features(4)
    names = ["b", "a", "d", "c"]
    write_store(tmp_path / "store", "ds", dict(zip(names, features)),
                relative_paths={"a": "x/a.wav", "b": "y/b.flac", "c": "x/sub/c.wav", "d": "y/d.mp3"})
    return tmp_path / "store", dict(zip(names, features))


def test_layers_and_order(store):
    root, features = store
    mean = load_dataset_features(root, "ds")
    assert mean.track_ids == ["a", "c", "b", "d"]  # sorted by relative path
    assert mean.vectors.shape == (4, 8) and mean.vectors.dtype == np.float32
    assert np.allclose(mean.vectors[0], features["a"].mean(axis=0), atol=1e-6)
    last = load_dataset_features(root, None, layer=-1)
    assert last.layer == 2 and np.array_equal(last.vectors[1], features["c"][2])
    every = load_dataset_features(root, "ds", layer="all")
    assert every.vectors.shape == (4, 3, 8) and every.fingerprint == mean.fingerprint
    assert every.provenance["hidden_size"] == 8


def test_fingerprint_follows_content_not_names(store):
    root, features = store
    before = load_dataset_features(root, "ds").fingerprint
    write_store(root, "ds", {"a": features["a"] + 1}, relative_paths={"a": "x/a.wav"})
    assert load_dataset_features(root, "ds").fingerprint != before


def test_dataset_resolution(tmp_path, store):
    root, _ = store
    assert resolve_dataset(root, None) == "ds"
    write_store(root, "other", {"z": _features(1)[0]})
    with pytest.raises(ValueError, match=r"has 2 datasets \(ds, other\): choose one with --dataset"):
        resolve_dataset(root, None)
    with pytest.raises(FileNotFoundError, match="dataset 'missing' does not exist in store"):
        load_dataset_features(root, "missing")
    assert not (root / "missing").exists()  # looking never creates a dataset folder
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_dataset(tmp_path / "no-store", None)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no dataset folder"):
        resolve_dataset(tmp_path / "empty", None)


def test_nan_mixed_dimensions_and_missing_files_are_refused(store):
    root, _ = store
    with pytest.raises(ValueError, match="layer 3 is out of range"):
        load_dataset_features(root, "ds", layer=3)
    bad = _features(1)[0]
    bad[1, 3] = np.nan
    atomic_save_npy(root / "ds" / "aggregated" / "c.npy", bad)
    with pytest.raises(ValueError, match=r"track c \(x/sub/c.wav\) has 1 non-finite values"):
        load_dataset_features(root, "ds")
    atomic_save_npy(root / "ds" / "aggregated" / "c.npy", _features(1, hidden=16)[0])
    with pytest.raises(ValueError, match=r"mixes embedding dimensions \(3 with shape \[3, 8\] \(e.g. x/a.wav\), "
                                         r"1 with shape \[3, 16\] \(e.g. x/sub/c.wav\)\)"):
        load_dataset_features(root, "ds")
    (root / "ds" / "aggregated" / "c.npy").unlink()
    with pytest.raises(StoreError, match="c.npy is missing although the manifest marks x/sub/c.wav done"):
        load_dataset_features(root, "ds")


def test_match_track_by_id_path_or_unique_name(store):
    root, _ = store
    tracks = load_dataset_features(root, "ds").tracks
    assert match_track("b", tracks) == 2
    assert match_track("x/sub/c.wav", tracks) == 1 and match_track("./x\\sub\\c.wav", tracks) == 1
    assert match_track("d.mp3", tracks) == 3 and match_track("nope.wav", tracks) is None


def test_labels_csv(tmp_path, store, caplog):
    root, _ = store
    tracks = load_dataset_features(root, "ds").tracks
    csv = tmp_path / "labels.csv"
    csv.write_text("\ufefffile,genre,mood\na.wav,rock,\ny/b.flac,jazz,calm\nd,rock,happy\n", encoding="utf-8")
    labels, notes = read_labels_csv(csv, tracks)
    assert labels == {"genre": ["rock", None, "jazz", "rock"], "mood": [None, None, "calm", "happy"]}
    assert notes == [] and not caplog.records

    # Labels of a whole corpus, of which a few files are extracted: the rest is left out, with a warning.
    csv.write_text("file,genre\na.wav,rock\nghost.wav,pop\nother/ghost2.wav,pop\n")
    labels, notes = read_labels_csv(csv, tracks)
    assert labels == {"genre": ["rock", None, None, None]}
    assert notes == [f"{csv}: 2 of 3 rows name recordings that are not extracted ('ghost.wav' (line 3), "
                     "'other/ghost2.wav' (line 4)); the analysis uses the labels of the 1 that are extracted"]
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [("WARNING", notes[0])]

    csv.write_text("file,genre\nghost.wav,pop\n")
    with pytest.raises(ValueError, match=r"none of its 1 rows names an extracted track of the dataset \(4 tracks\): "
                                         r"'ghost.wav' \(line 2\)"):
        read_labels_csv(csv, tracks)
    csv.write_text("file,genre\n")
    with pytest.raises(ValueError, match="no rows"):
        read_labels_csv(csv, tracks)
    csv.write_text("name,genre\na.wav,rock\n")
    with pytest.raises(ValueError, match=r"no 'file' column \(columns: name, genre\)"):
        read_labels_csv(csv, tracks)
    csv.write_text("file,genre\na.wav,rock\nx/a.wav,pop\n")
    with pytest.raises(ValueError, match="lines 2 and 3 both label track x/a.wav"):
        read_labels_csv(csv, tracks)
    csv.write_text("file\na.wav\n")
    with pytest.raises(ValueError, match="no label column"):
        read_labels_csv(csv, tracks)
    # A file name two extracted tracks have is no warning: the row's track cannot be told.
    twin = TrackInfo("e", "z/a.wav", "z/a.wav", None, None, None)
    csv.write_text("file,genre\nd,rock\na.wav,pop\n")
    with pytest.raises(ValueError, match=r"labels.csv, line 3: 'a.wav' names 2 tracks \(x/a.wav, z/a.wav\)"):
        read_labels_csv(csv, [*tracks, twin])


def test_folder_labels(store):
    root, _ = store
    tracks = load_dataset_features(root, "ds").tracks
    assert folder_labels(tracks) == {"folder": ["x", "x", "y", "y"]}
    assert folder_labels(tracks[:2]) is None
