"""Similar-track search: cosine neighbours of a stored track (or of a vector from outside, see
``mess_ai.analysis.audio_search``), optionally diversified by maximal marginal relevance.

Vectors are centred and L2-normalised (``PreprocessConfig()``), so the similarity is the cosine after removing
what all tracks share. The fitted transform is cached under ``<store>/<dataset>/index/``; from
``faiss_min_tracks`` tracks on, a faiss ``IndexFlatIP`` (exact inner product) is cached there too, so a query reads
the manifest, the index and nothing else. Both are rebuilt when the dataset's content key changes: the set of done
tracks with their source sha256 and extraction config key, never file times.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from mess_ai.analysis.loading import (
    TrackInfo,
    aggregated_path,
    load_aggregated,
    match_track,
    read_tracks,
    tracks_fingerprint,
)
from mess_ai.analysis.preprocessing import (
    LAYER_MEAN,
    FittedTransform,
    Layer,
    PreprocessConfig,
    check_layer,
    fit_transform,
)
from mess_ai.store.atomic import atomic_target, atomic_write_json, read_npy_header

log = logging.getLogger(__name__)

INDEX_DIR = "index"
FAISS_MIN_TRACKS = 2000
MMR_LAMBDA = 0.5
# Bump when the cached files change meaning, so old caches are rebuilt.
INDEX_FORMAT_VERSION = 1
_PREPROCESS = PreprocessConfig()


def _faiss() -> Any | None:
    """The faiss module, or None when it is not installed (exact numpy search is used instead)."""
    try:
        import faiss
    except ImportError:
        return None
    return faiss


def cosine_neighbours(vectors: np.ndarray, query: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """For unit rows ``vectors`` [n, d]: the indices int [m] and similarities float [m] of the m = min(k, n - 1)
    rows most similar to row ``query``, the query itself excluded, most similar first."""
    n = vectors.shape[0]
    if not 0 <= query < n:
        raise ValueError(f"query index {query} is out of range for {n} vectors")
    return _nearest_rows(vectors, vectors[query], k, exclude=query)


def _nearest_rows(vectors: np.ndarray, q: np.ndarray, k: int, exclude: int | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """For unit rows ``vectors`` [n, d] and a unit ``q`` [d]: the indices int [m] and similarities float [m] of
    the m rows most similar to ``q`` (m = k, at most the rows there are besides ``exclude``), most similar first,
    ties by index."""
    if k < 1:
        raise ValueError(f"k is {k}; it must be at least 1")
    similarities = vectors @ q
    candidates = np.arange(len(vectors))
    if exclude is not None:
        candidates = candidates[candidates != exclude]
    m = min(k, len(candidates))
    top = candidates[np.argpartition(-similarities[candidates], m - 1)[:m]] if m < len(candidates) else candidates
    order = np.lexsort((top, -similarities[top]))
    return top[order], similarities[top[order]]


def mmr_select(query: np.ndarray, candidates: np.ndarray, k: int, lambda_: float = MMR_LAMBDA) -> list[int]:
    """Maximal marginal relevance: pick k of the unit rows ``candidates`` [m, d] for the unit ``query`` [d], each
    time the one maximising ``lambda_ * relevance - (1 - lambda_) * redundancy``; returns positions in pick order.

    Redundancy is ``1 - sqrt(1 - s**2)`` for ``s``, the largest similarity to an already picked row (negative
    counts as 0): the share of the candidate that the picked row already explains. With the plain ``s`` of classic
    MMR, a first pick that is a near-copy of the query has ``s`` equal to every candidate's relevance, so every
    score collapses to ``(2 * lambda_ - 1) * relevance`` and the near-copies keep coming (or, below 0.5, the least
    relevant track wins). This form penalises near-copies fully and merely related tracks mildly.
    """
    if not 0.0 <= lambda_ <= 1.0:
        raise ValueError(f"lambda_ is {lambda_}; it must lie in [0, 1]")
    relevance = candidates @ query
    redundancy = np.zeros(len(candidates))
    available = np.ones(len(candidates), dtype=bool)
    picked: list[int] = []
    for _ in range(min(k, len(candidates))):
        score = np.where(available, lambda_ * relevance - (1.0 - lambda_) * redundancy, -np.inf)
        best = int(np.argmax(score))
        picked.append(best)
        available[best] = False
        overlap = np.clip(candidates @ candidates[best], 0.0, 1.0)
        redundancy = np.maximum(redundancy, 1.0 - np.sqrt(1.0 - overlap ** 2))
    return picked


@dataclass(frozen=True, eq=False)
class SearchIndex:
    """Unit vectors of a dataset's tracks, in memory (``vectors`` float32 [n, d]) or in a faiss index, and the
    fitted ``transform`` that made them from the tracks' aggregated vectors (one layer or the layer mean)."""

    tracks: tuple[TrackInfo, ...]
    transform: FittedTransform
    vectors: np.ndarray | None
    faiss_index: Any | None

    def vector_rows(self, indices: Sequence[int]) -> np.ndarray:
        """float32 [len(indices), d]."""
        indices = np.asarray(indices, dtype=np.int64)
        if self.vectors is not None:
            return self.vectors[indices]
        return self.faiss_index.reconstruct_batch(indices)

    def query_vector(self, vector: np.ndarray) -> np.ndarray:
        """A vector from outside the index, float [hidden] as the tracks' own (same layer), through the tracks'
        transform: float32 [d], comparable with the rows."""
        vector = np.asarray(vector)
        if vector.shape != (self.transform.n_features,):
            raise ValueError(f"the query vector has shape {list(vector.shape)}; the index's tracks have "
                             f"[{self.transform.n_features}]")
        return self.transform.transform(vector[None])[0].astype(np.float32)

    def nearest(self, q: np.ndarray, k: int, exclude: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The indices int [m] and similarities float [m] of the tracks most similar to the unit ``q`` float32 [d]
        (a row, or a ``query_vector``), ``exclude`` left out; m = k, at most the tracks there are. Most similar
        first."""
        if self.vectors is not None:
            return _nearest_rows(self.vectors, q, k, exclude)
        m = min(k, len(self.tracks) - (exclude is not None))
        # One more than asked when a track is left out: a query row finds itself (or a tie with itself).
        similarities, indices = self.faiss_index.search(q[None], m + (exclude is not None))
        keep = indices[0] != exclude if exclude is not None else indices[0] >= 0
        return indices[0][keep][:m].astype(np.int64), similarities[0][keep][:m].astype(np.float64)


def _cache_key(fingerprint: str, layer: Layer) -> str:
    payload = json.dumps({"format": INDEX_FORMAT_VERSION, "tracks": fingerprint, "layer": layer,
                          "preprocess": _PREPROCESS.to_dict()}, sort_keys=True)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def _load_cached(index_dir: Path, name: str, key: str, n_tracks: int, faiss: Any | None
                 ) -> tuple[tuple[FittedTransform, Any | None] | None, str]:
    """((the fitted transform, the faiss index when ``faiss`` is given), "") from the cache built for ``key``; or
    (None, why there is none to use): no cache yet, one built for other tracks or another kind of index, or one
    that cannot be read."""
    meta_path = index_dir / f"{name}.json"
    if not meta_path.exists():
        return None, "first query"
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if meta.get("key") != key:
            return None, "the tracks changed since it was built"
        if (meta["faiss"] is None) != (faiss is None):
            return None, f"it was built {'without' if faiss is not None else 'with'} faiss"
        transform, transform_meta = FittedTransform.load(index_dir / meta["transform"])
        index = faiss.read_index(str(index_dir / meta["faiss"])) if faiss is not None else None
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
        return None, f"its cache {meta_path} cannot be read ({exc})"
    if transform_meta.get("key") != key or (index is not None and index.ntotal != n_tracks):
        return None, f"its cache {meta_path} does not match the files it names"
    return (transform, index), ""


def _write_cache(index_dir: Path, name: str, key: str, transform: FittedTransform, index: Any | None,
                 faiss: Any | None) -> None:
    # File names carry the key, so a reader never pairs a new index with an old transform; the JSON that points
    # at them is written last, and older files of this layer are removed once it is in place.
    stem = f"{name}-{key[:16]}"
    transform.save(index_dir / f"{stem}.transform", meta={"key": key})
    faiss_name = None
    if index is not None:
        faiss_name = f"{stem}.faiss"
        with atomic_target(index_dir / faiss_name) as temp:
            faiss.write_index(index, str(temp))
    atomic_write_json(index_dir / f"{name}.json", {"key": key, "transform": f"{stem}.transform",
                                                   "faiss": faiss_name, "format": INDEX_FORMAT_VERSION})
    for old in index_dir.glob(f"{name}-*"):
        if not old.name.startswith(stem):
            old.unlink(missing_ok=True)


def open_index(store_root: str | Path, dataset: str, tracks: Sequence[TrackInfo], layer: Layer,
               faiss_min_tracks: int = FAISS_MIN_TRACKS) -> SearchIndex:
    """The search index of a dataset's tracks for one layer (``"mean"`` or an index), from the cache or built."""
    index_dir = Path(store_root).absolute() / dataset / INDEX_DIR
    name = f"layer-{layer}"
    key = _cache_key(tracks_fingerprint(tracks), layer)
    faiss = _faiss() if len(tracks) >= faiss_min_tracks else None
    if len(tracks) >= faiss_min_tracks and faiss is None:
        log.info("faiss is not installed: exact numpy search over %d tracks", len(tracks))
    cached, why_not = _load_cached(index_dir, name, key, len(tracks), faiss)
    if cached is not None and cached[1] is not None:
        return SearchIndex(tuple(tracks), cached[0], None, cached[1])
    raw, _ = load_aggregated(store_root, dataset, tracks, layer)
    if cached is not None:
        return SearchIndex(tuple(tracks), cached[0], cached[0].transform(raw).astype(np.float32), None)
    log.info("building the search index of dataset '%s' (%d tracks, layer %s): %s", dataset, len(tracks), layer,
             why_not)
    transform = fit_transform(raw, _PREPROCESS)
    vectors = transform.transform(raw).astype(np.float32)
    index = None
    if faiss is not None:
        index = faiss.IndexFlatIP(vectors.shape[1])
        index.add(vectors)
    _write_cache(index_dir, name, key, transform, index, faiss)
    return SearchIndex(tuple(tracks), transform, vectors, index)


def _unknown_track(name: str, dataset: str, tracks: Sequence[TrackInfo]) -> ValueError:
    known = [t.track_id for t in tracks] + [t.relative_path for t in tracks]
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return ValueError(f"unknown track {name!r} in dataset {dataset!r} ({len(tracks)} extracted tracks): give a "
                      f"track id, a path relative to the audio folder or a file name{hint}")


def check_k(k: Any) -> None:
    """ValueError unless ``k`` is an integer of at least 1."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k is {k!r}; it must be an integer of at least 1")


def find_similar(store_root: str | Path, dataset: str | None, track_id: str, k: int = 10,
                 layer: Layer = LAYER_MEAN, diverse: bool = False, *,
                 faiss_min_tracks: int = FAISS_MIN_TRACKS, manifest_url: str | None = None) -> list[dict]:
    """The ``k`` tracks most similar to ``track_id`` (a track id, relative path or unique file name), the track
    itself excluded: ``{"rank", "track_id", "relative_path", "similarity"}``, most similar first. ``diverse``
    re-ranks a wider pool by maximal marginal relevance, so near-duplicates do not crowd the list.

    Fewer than ``k`` come back when the dataset has fewer other tracks. ValueError for an unknown track, a bad
    ``k`` or ``layer``, or a dataset of a single track.
    """
    check_k(k)
    dataset, tracks, _ = read_tracks(store_root, dataset, manifest_url)
    query = match_track(track_id, tracks)
    if query is None:
        raise _unknown_track(track_id, dataset, tracks)
    if len(tracks) < 2:
        raise ValueError(f"dataset {dataset!r} has {len(tracks)} extracted track; similarity search needs at least 2")
    n_states = read_npy_header(aggregated_path(store_root, dataset, tracks[query].track_id))[0][0]
    layer = check_layer(layer, n_states)
    index = open_index(store_root, dataset, tracks, layer, faiss_min_tracks)
    return ranked(index, index.vector_rows([query])[0], k, diverse, exclude=query)


def ranked(index: SearchIndex, q: np.ndarray, k: int, diverse: bool, exclude: int | None = None) -> list[dict]:
    """The ``k`` tracks of ``index`` most similar to the unit ``q`` float32 [d] (``exclude`` left out) as
    ``find_similar`` lists them; ``diverse`` re-ranks a wider pool by maximal marginal relevance."""
    if diverse:
        pool, _ = index.nearest(q, max(10 * k, 100), exclude)
        candidates = index.vector_rows(pool).astype(np.float64)
        q = q.astype(np.float64)
        picks = mmr_select(q, candidates, k)
        chosen, similarities = pool[picks], candidates[picks] @ q
    else:
        chosen, similarities = index.nearest(q, k, exclude)
    tracks = index.tracks
    return [{"rank": rank, "track_id": tracks[i].track_id, "relative_path": tracks[i].relative_path,
             "similarity": float(s)} for rank, (i, s) in enumerate(zip(chosen, similarities), start=1)]
