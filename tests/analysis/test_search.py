"""Similar-track search: planted neighbours first, the query excluded, diversity, errors, and the index cache."""

from __future__ import annotations

import os

import numpy as np
import pytest

from mess_ai.analysis import search
from mess_ai.analysis.loading import load_aggregated, read_tracks
from mess_ai.analysis.search import cosine_neighbours, find_similar, mmr_select, open_index
from mess_ai.errors import StoreError
from tests.helpers.embeddings import layered, write_store


def _planted(seed: int = 0, n_unrelated: int = 30, hidden: int = 32):
    """A query, 4 near-copies of it, 8 related tracks (similar but distinct) and unrelated ones: [n, hidden]."""
    rng = np.random.default_rng(seed)
    query = rng.standard_normal(hidden)
    copies = query + 0.02 * rng.standard_normal((4, hidden))
    related = 0.8 * query + 0.6 * rng.standard_normal((8, hidden))
    unrelated = rng.standard_normal((n_unrelated, hidden))
    names = (["query"] + [f"copy{i}" for i in range(4)] + [f"related{i}" for i in range(8)]
             + [f"other{i:02d}" for i in range(n_unrelated)])
    return names, np.vstack([query, copies, related, unrelated])


@pytest.fixture
def planted_store(tmp_path):
    names, vectors = _planted()
    features = layered(vectors)
    write_store(tmp_path / "store", "planted", dict(zip(names, features)),
                relative_paths={n: f"{n[:5]}/{n}.wav" for n in names})
    return tmp_path / "store", names, vectors


def test_cosine_neighbours_excludes_the_query_and_sorts():
    unit = np.eye(4)[[0, 1, 2]] + 0.0
    unit[2] = [0.6, 0.8, 0, 0]
    indices, sims = cosine_neighbours(unit, 0, 5)
    assert indices.tolist() == [2, 1] and np.allclose(sims, [0.6, 0.0])


def test_planted_nearest_neighbour_comes_first(tmp_path):
    rng = np.random.default_rng(3)
    vectors = rng.standard_normal((20, 32))
    vectors[7] = vectors[12] + 0.05 * rng.standard_normal(32)
    names = [f"t{i:02d}" for i in range(20)]
    write_store(tmp_path / "store", "d", dict(zip(names, layered(vectors))))
    results = find_similar(tmp_path / "store", "d", "t12", k=5)
    assert results[0]["track_id"] == "t07" and results[0]["rank"] == 1
    assert "t12" not in [r["track_id"] for r in results] and len(results) == 5
    assert [r["similarity"] for r in results] == sorted((r["similarity"] for r in results), reverse=True)
    # The same track named by its relative path or file name, and a single layer.
    assert find_similar(tmp_path / "store", None, "t12.wav", k=1, layer=2)[0]["track_id"] == "t07"
    assert len(find_similar(tmp_path / "store", "d", "t12", k=50)) == 19


def test_diverse_returns_fewer_near_duplicates(planted_store):
    store, _, _ = planted_store
    plain = find_similar(store, "planted", "query", k=5)
    diverse = find_similar(store, "planted", "query", k=5, diverse=True)
    copies = lambda results: sum(r["track_id"].startswith("copy") for r in results)  # noqa: E731
    assert copies(plain) == 4
    assert 1 <= copies(diverse) <= 2
    assert diverse[0]["track_id"].startswith("copy")  # the best match still leads
    assert all(r["track_id"].startswith(("copy", "related")) for r in diverse)  # diverse, not random


def test_mmr_with_lambda_one_is_plain_ranking():
    rng = np.random.default_rng(0)
    candidates = rng.standard_normal((10, 6))
    candidates /= np.linalg.norm(candidates, axis=1, keepdims=True)
    query = candidates[0]
    assert mmr_select(query, candidates, 4, lambda_=1.0) == list(np.argsort(-(candidates @ query))[:4])
    with pytest.raises(ValueError, match="lambda_ is 1.5"):
        mmr_select(query, candidates, 2, lambda_=1.5)


def test_unknown_track_and_bad_arguments_are_clear(planted_store):
    store, _, _ = planted_store
    with pytest.raises(ValueError, match=r"unknown track 'qeury' in dataset 'planted' \(43 extracted tracks\).*"
                                         r"did you mean 'query'"):
        find_similar(store, "planted", "qeury")
    with pytest.raises(ValueError, match="k is 0"):
        find_similar(store, "planted", "query", k=0)
    with pytest.raises(ValueError, match="layer 5 is out of range: the features have 3 hidden states"):
        find_similar(store, "planted", "query", layer=5)
    with pytest.raises(FileNotFoundError, match="dataset 'nope' does not exist"):
        find_similar(store, "nope", "query")


def test_a_manifest_elsewhere_is_used_and_a_missing_one_refused(planted_store):
    store, _, _ = planted_store
    elsewhere = store.parent / "manifest-elsewhere.sqlite"
    (store / "manifest.sqlite").rename(elsewhere)
    with pytest.raises(StoreError, match="no manifest at .*manifest.sqlite: is .* a mess-ai store"):
        find_similar(store, "planted", "query")
    assert not (store / "manifest.sqlite").exists()
    results = find_similar(store, "planted", "query", k=2, manifest_url=f"sqlite:///{elsewhere}")
    assert [r["track_id"][:4] for r in results] == ["copy", "copy"]


def test_a_single_track_dataset_is_refused(tmp_path):
    write_store(tmp_path / "store", "one", {"only": np.ones((3, 8), dtype=np.float32)})
    with pytest.raises(ValueError, match="dataset 'one' has 1 extracted track; similarity search needs at least 2"):
        find_similar(tmp_path / "store", "one", "only")


def test_index_cache_is_reused_until_the_content_changes(planted_store, monkeypatch):
    store, names, vectors = planted_store
    first = find_similar(store, "planted", "query", k=5)
    index_dir = store / "planted" / "index"
    assert (index_dir / "layer-mean.json").exists() and list(index_dir.glob("layer-mean-*.transform.npy"))

    fits = []
    real_fit = search.fit_transform
    monkeypatch.setattr(search, "fit_transform", lambda *a, **k: fits.append(1) or real_fit(*a, **k))
    # New file times alone (a re-extraction of the same bytes) do not invalidate the cache.
    for path in (store / "planted" / "aggregated").iterdir():
        os.utime(path, ns=(1, 1))
    assert find_similar(store, "planted", "query", k=5) == first and fits == []

    # A new track changes the content key: the cache is rebuilt and the track is found.
    write_store(store, "planted", {"late": layered(vectors[[1]] + 1e-4)[0]}, relative_paths={"late": "late.wav"})
    assert "late" in [r["track_id"] for r in find_similar(store, "planted", "query", k=5)] and fits == [1]
    assert len(list(index_dir.glob("layer-mean-*.transform.npy"))) == 1  # the old files are gone


def test_faiss_index_is_built_cached_and_matches_exact_search(planted_store, monkeypatch):
    pytest.importorskip("faiss")
    store, _, _ = planted_store
    exact = find_similar(store, "planted", "related3", k=6)
    with_faiss = find_similar(store, "planted", "related3", k=6, faiss_min_tracks=10)
    assert [r["track_id"] for r in with_faiss] == [r["track_id"] for r in exact]
    assert np.allclose([r["similarity"] for r in with_faiss], [r["similarity"] for r in exact], atol=1e-5)
    assert list((store / "planted" / "index").glob("layer-mean-*.faiss"))

    # From the cache, a query reads neither the features nor refits anything.
    def refuse(*args, **kwargs):
        raise AssertionError("features were loaded although the faiss cache is valid")

    monkeypatch.setattr(search, "load_aggregated", refuse)
    again = find_similar(store, "planted", "related3", k=6, faiss_min_tracks=10, diverse=True)
    assert len(again) == 6 and again[0]["track_id"] == exact[0]["track_id"]


def test_without_faiss_the_exact_search_is_used(planted_store, monkeypatch):
    store, _, _ = planted_store
    monkeypatch.setattr(search, "_faiss", lambda: None)
    results = find_similar(store, "planted", "query", k=3, faiss_min_tracks=10)
    assert results[0]["track_id"].startswith("copy")
    assert not list((store / "planted" / "index").glob("*.faiss"))


def test_a_vector_from_outside_goes_through_the_tracks_transform(planted_store):
    """An outside vector (here a stored track's own, as a recording of it would give) is transformed as the
    tracks were and finds that track first with similarity 1, in the numpy and the faiss index alike."""
    store, _, _ = planted_store
    dataset, tracks, _ = read_tracks(store, "planted")
    raw, _ = load_aggregated(store, dataset, tracks, "mean")
    row = [t.track_id for t in tracks].index("related3")
    kinds = [open_index(store, dataset, tracks, "mean")]
    if search._faiss() is not None:
        open_index(store, dataset, tracks, "mean", faiss_min_tracks=10)  # built: in memory too
        kinds.append(open_index(store, dataset, tracks, "mean", faiss_min_tracks=10))  # from the cache: faiss only
        assert kinds[1].vectors is None and kinds[1].faiss_index is not None
    for index in kinds:
        q = index.query_vector(raw[row])
        assert np.allclose(q, index.vector_rows([row])[0], atol=1e-6)
        chosen, similarities = index.nearest(q, 3)
        assert chosen[0] == row and similarities[0] == pytest.approx(1.0, abs=1e-5) and len(chosen) == 3
        assert index.nearest(q, 3, exclude=row)[0].tolist() == chosen[1:].tolist() + [index.nearest(q, 4)[0][3]]
    with pytest.raises(ValueError, match=r"the query vector has shape \[5\]; the index's tracks have \[32\]"):
        kinds[0].query_vector(np.zeros(5))
