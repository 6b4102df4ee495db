"""How varied a set of embeddings is, how it covers the collection's labels, and how embedding methods compare.

The Vendi score (Friedman & Dieng, 2023) is the exponential of the Shannon entropy of the eigenvalues of K / n,
with K the cosine-similarity matrix: the effective number of distinct items. k identical items score 1, k
mutually orthogonal items score k. Linear CKA (Kornblith et al., 2019) measures how alike two representations of
the same tracks are, 1 for representations equal up to rotation and scale.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from mess_ai.analysis.embedding_analyzer import (
    components_for,
    each_layer,
    explained_variance_ratio,
    knn_label_accuracy,
    mean_cosine_similarity,
    participation_ratio,
    unit_silhouette,
    unit_vectors,
)
from mess_ai.analysis.preprocessing import (
    LAYER_MEAN,
    PreprocessConfig,
    check_features,
    check_matrix,
    fit_transform,
    l2_normalize,
    select_layer,
)

# Eigenvalues below this are rounding noise of a rank-deficient kernel; 0 log 0 counts as 0.
_EIGEN_FLOOR = 1e-12
# A label is under-covered with fewer tracks than this fraction of an even share of the labelled tracks, or
# with fewer than _MIN_LABEL_TRACKS (its spread and neighbours are then too few to judge).
_UNDER_COVERED_SHARE = 0.5
_MIN_LABEL_TRACKS = 3
BASELINE_METHOD = "MFCC + chroma (librosa)"


def vendi_score(X: np.ndarray) -> float:
    """Vendi score of the rows of X [n, d] under the cosine kernel, in [1, min(n, d)]."""
    X = check_matrix(X, min_samples=1)
    norms = np.linalg.norm(X, axis=1)
    zero = np.flatnonzero(norms == 0)
    if zero.size:
        raise ValueError(f"X has {zero.size} all-zero rows (first: row {zero[0]}); cosine similarity is "
                         "undefined for them")
    Z = X / norms[:, None]
    n, d = Z.shape
    # K / n = Z Z^T / n has the same non-zero eigenvalues as Z^T Z / n: decompose the smaller of the two.
    gram = Z.T @ Z if d < n else Z @ Z.T
    eigenvalues = np.linalg.eigvalsh(gram / n)
    eigenvalues = eigenvalues[eigenvalues > _EIGEN_FLOOR]
    return float(np.exp(-np.sum(eigenvalues * np.log(eigenvalues))))


def centred_vendi_score(X: np.ndarray) -> float:
    """Vendi score of the centred rows of X [n, d]. Rows equal to the mean have no direction once centred and
    are left out; 1.0 when every row is."""
    Z = unit_vectors(X)
    nonzero = np.linalg.norm(Z, axis=1) > 0
    return vendi_score(Z[nonzero]) if nonzero.any() else 1.0


def pairwise_similarities(X: np.ndarray, max_samples: int = 2000, random_state: int = 0) -> np.ndarray:
    """Centred cosine similarities of all pairs i < j of X [n, d]: float [n (n - 1) / 2]; above ``max_samples``
    rows, of the pairs of a random sample of that many rows."""
    X = check_matrix(X, min_samples=2)
    if X.shape[0] > max_samples:
        rows = np.random.default_rng(random_state).choice(X.shape[0], max_samples, replace=False)
        X = X[np.sort(rows)]
    Z = unit_vectors(X)
    upper = np.triu_indices(Z.shape[0], k=1)
    return (Z @ Z.T)[upper]


def _cka_terms(X: np.ndarray) -> tuple[np.ndarray, float]:
    """X [n, d] centred, and the Frobenius norm of its Gram matrix (the same for X^T X and X X^T)."""
    X = X - X.mean(axis=0)
    return X, float(np.linalg.norm(X.T @ X if X.shape[1] <= X.shape[0] else X @ X.T))


def _cka(x: tuple[np.ndarray, float], y: tuple[np.ndarray, float]) -> float | None:
    (X, norm_x), (Y, norm_y) = x, y
    if norm_x == 0 or norm_y == 0:
        return None
    return float(min(np.linalg.norm(X.T @ Y) ** 2 / (norm_x * norm_y), 1.0))


def linear_cka(X: np.ndarray, Y: np.ndarray) -> float | None:
    """Linear centred kernel alignment of two representations X [n, d_x] and Y [n, d_y] of the same n tracks,
    in [0, 1]; None when either has no variance."""
    X = check_matrix(X, min_samples=2)
    Y = check_matrix(Y, min_samples=2, what="Y")
    if X.shape[0] != Y.shape[0]:
        raise ValueError(f"X has {X.shape[0]} rows and Y {Y.shape[0]}: CKA compares representations of the same "
                         "tracks")
    return _cka(_cka_terms(X), _cka_terms(Y))


def check_labels(metadata: Mapping[str, Sequence[Any]] | Sequence[Mapping[str, Any]], n_tracks: int
                 ) -> dict[str, list[str | None]]:
    """Label columns ``{column: one label per track}`` from columns (a mapping, a DataFrame too) or from one record
    per track (``[{"genre": ..., "composer": ...}, ...]``), as strings with None for "no label" (None, NaN, "" or a
    missing key). ValueError for a column or a record list of another length."""
    if not hasattr(metadata, "items"):
        records = list(metadata)
        if len(records) != n_tracks:
            raise ValueError(f"metadata has {len(records)} records for {n_tracks} tracks")
        metadata = {key: [record.get(key) for record in records]
                    for key in dict.fromkeys(key for record in records for key in record)}
    columns: dict[str, list[str | None]] = {}
    for column, values in metadata.items():
        values = list(values)
        if len(values) != n_tracks:
            raise ValueError(f"label column {column!r} has {len(values)} values for {n_tracks} tracks")
        columns[str(column)] = [None if v is None or (isinstance(v, float) and np.isnan(v)) or v == "" else str(v)
                                for v in values]
    return columns


def label_agreement(X: np.ndarray, values: Sequence[str | None], center: bool = True) -> float | None:
    """Leave-one-out k-NN label agreement (``knn_label_accuracy``) on the labelled rows of X [n, d]."""
    labelled = np.array([v is not None for v in values])
    if labelled.sum() < 3:
        return None
    return knn_label_accuracy(X[labelled], np.array([v for v in values if v is not None]), center=center)


def representations(features: np.ndarray) -> dict[str, np.ndarray]:
    """The ways to represent tracks from features float [n_tracks, n_layers, hidden] that
    ``compare_embedding_methods`` weighs against each other, each float64 [n_tracks, d]:

    ``layer i, centred``: layer i centred and L2-normalised, as similarity search compares it;
    ``layer mean, raw``: the mean over layers as stored; ``layer mean, centred``: that centred and L2-normalised
    (search's default); ``layer mean, whitened``: projected on the principal axes holding 90 % of its variance,
    each scaled to unit variance, then L2-normalised.
    """
    features = check_features(features, min_samples=2)
    if features.ndim != 3:
        raise ValueError(f"features must be [n_tracks, n_layers, hidden]; got shape {list(features.shape)}")
    methods = {f"layer {i}, centred": unit_vectors(features[:, i]) for i in range(features.shape[1])}
    mean = select_layer(features, LAYER_MEAN)
    methods["layer mean, raw"] = mean
    methods["layer mean, centred"] = unit_vectors(mean)
    k = components_for(explained_variance_ratio(mean), 0.9)
    if k is not None:
        methods["layer mean, whitened"] = fit_transform(mean, PreprocessConfig(whiten=True, n_components=k)
                                                        ).transform(mean)
    return methods


@dataclass(frozen=True)
class DiversityAnalyzer:
    """Diversity of embeddings, their coverage of labels, and comparisons of embedding methods."""

    max_samples: int = 2000
    random_state: int = 0

    def calculate_diversity(self, embeddings: np.ndarray) -> dict | list[dict]:
        """Diversity of X [n_tracks, n_features] (or of each layer of [n_tracks, n_layers, hidden], as a list):
        ``mean_pairwise_cosine_distance`` (1 - mean cosine similarity of the vectors as given),
        ``vendi_score`` (of the centred vectors: the effective number of distinct tracks), ``vendi_score_raw``,
        ``mean_cosine_similarity_raw`` (anisotropy) and the distribution of centred pairwise similarities
        (above ``max_samples`` tracks, of a random sample)."""
        return each_layer(embeddings, self._diversity, min_samples=2)

    def _diversity(self, X: np.ndarray) -> dict:
        similarities = pairwise_similarities(X, self.max_samples, self.random_state)
        levels = (0.01, 0.25, 0.5, 0.75, 0.99)
        anisotropy = mean_cosine_similarity(X)
        nonzero = np.linalg.norm(X, axis=1) > 0
        return {
            "n_tracks": int(X.shape[0]),
            "mean_pairwise_cosine_distance": 1.0 - anisotropy,
            "vendi_score": centred_vendi_score(X),
            "vendi_score_raw": vendi_score(X[nonzero]) if nonzero.any() else 1.0,
            "mean_cosine_similarity_raw": anisotropy,
            "pairwise_similarity": {
                "pairs": int(similarities.size),
                "mean": float(similarities.mean()),
                "std": float(similarities.std()),
                "quantiles": {f"{q:g}": float(v) for q, v in zip(levels, np.quantile(similarities, levels))},
            },
        }

    def analyze(self, X: np.ndarray, clusters: np.ndarray | None = None) -> dict:
        """``calculate_diversity(X)`` for X [n_tracks, n_features], plus the centred Vendi score of each cluster
        of ``clusters`` int [n_tracks]."""
        X = check_matrix(X, min_samples=2)
        result = self.calculate_diversity(X)
        if clusters is not None:
            clusters = np.asarray(clusters)
            if clusters.shape != (X.shape[0],):
                raise ValueError(f"clusters has shape {list(clusters.shape)}; expected [{X.shape[0]}]")
            Z = unit_vectors(X)
            nonzero = np.linalg.norm(Z, axis=1) > 0
            result["vendi_score_by_cluster"] = {
                int(c): vendi_score(Z[(clusters == c) & nonzero]) if np.any((clusters == c) & nonzero) else 1.0
                for c in np.unique(clusters)}
        return result

    def analyze_musical_coverage(self, embeddings: np.ndarray,
                                 metadata: Mapping[str, Sequence[Any]] | Sequence[Mapping[str, Any]]) -> dict:
        """How the tracks X [n_tracks, n_features] cover each label column of ``metadata`` (``{column: a label
        per track}`` or a record per track, see ``check_labels``), in the centred cosine geometry. Per column:
        ``n_labelled``,
        ``labels`` (per label: ``n_tracks``, ``share`` of the labelled tracks, ``spread`` = mean cosine distance
        of its tracks to their mean direction, ``nearest_label`` and its centroid distance),
        ``centroid_distances`` (cosine distances between label mean directions), ``silhouette`` of the labels,
        ``knn_agreement`` (leave-one-out k-NN), ``under_covered`` (labels with fewer than half an even share of
        the labelled tracks, or fewer than 3 tracks). Undefined values are None.
        """
        X = check_matrix(embeddings, min_samples=2, what="embeddings")
        columns = check_labels(metadata, X.shape[0])
        if not columns:
            raise ValueError("metadata has no label column")
        Z = unit_vectors(X)
        return {column: self._coverage(Z, values) for column, values in columns.items()}

    def _coverage(self, Z: np.ndarray, values: list[str | None]) -> dict:
        labelled = np.flatnonzero([v is not None for v in values])
        names = np.array([values[i] for i in labelled], dtype=object)
        classes, counts = np.unique(names.astype(str), return_counts=True) if labelled.size else ([], [])
        centroids = np.array([Z[labelled[names == c]].mean(axis=0) for c in classes]).reshape(len(classes), -1)
        directions = l2_normalize(centroids)
        has_direction = np.linalg.norm(centroids, axis=1) > 0
        distances = np.clip(1.0 - directions @ directions.T, 0.0, 2.0)
        np.fill_diagonal(distances, 0.0)
        distances[~has_direction, :] = np.nan
        distances[:, ~has_direction] = np.nan
        even_share = labelled.size / max(len(classes), 1)
        labels, under_covered = {}, []
        for i, (c, count) in enumerate(zip(classes, counts)):
            members = Z[labelled[names == c]]
            others = [j for j in range(len(classes)) if j != i and np.isfinite(distances[i, j])]
            nearest = min(others, key=lambda j: distances[i, j]) if others else None
            labels[str(c)] = {
                "n_tracks": int(count),
                "share": float(count / labelled.size),
                "spread": float(np.mean(1.0 - members @ directions[i])) if count >= 2 and has_direction[i] else None,
                "nearest_label": None if nearest is None else str(classes[nearest]),
                "nearest_label_distance": None if nearest is None else float(distances[i, nearest]),
            }
            tracks = f"{count} track{'' if count == 1 else 's'}"
            if count < _MIN_LABEL_TRACKS:
                reason = f"{tracks}: fewer than {_MIN_LABEL_TRACKS}, too few to judge its spread and neighbours"
            elif count < _UNDER_COVERED_SHARE * even_share:
                reason = (f"{tracks}: fewer than half an even share ({even_share:.1f} tracks for each of "
                          f"{len(classes)} labels)")
            else:
                continue
            under_covered.append({"label": str(c), "n_tracks": int(count), "reason": reason})
        return {
            "n_labelled": int(labelled.size),
            "n_unlabelled": len(values) - int(labelled.size),
            "labels": labels,
            "centroid_distances": {"labels": [str(c) for c in classes],
                                   "matrix": [[None if np.isnan(d) else float(d) for d in row] for row in distances]},
            "silhouette": unit_silhouette(Z[labelled], names.astype(str), self.random_state, self.max_samples)
            if labelled.size else None,
            "knn_agreement": label_agreement(Z, values, center=False),
            "under_covered": under_covered,
        }

    def compare_embedding_methods(self, embeddings_dict: Mapping[str, np.ndarray],
                                  labels: Mapping[str, Sequence[Any]] | None = None) -> dict:
        """One table over representations ``{method: X [n_tracks, d_method]}`` of the same tracks, each taken as
        given (cosine of the vectors; centring or whitening are methods of their own, see ``representations``).

        Returns ``{"n_tracks", "methods": [row per method], "cka": {"methods": names, "matrix": [[...]]}}``; a row
        holds ``method``, ``n_features``, ``knn_label_agreement`` ({label column: leave-one-out k-NN agreement},
        with ``labels`` = ``{column: a label per track}``), ``anisotropy`` (mean cosine similarity of track pairs)
        and ``effective_dimension`` (participation ratio of the PCA spectrum); the matrix is the linear CKA of
        every pair of methods. ValueError when the methods cover different numbers of tracks.
        """
        if not embeddings_dict:
            raise ValueError("embeddings_dict is empty: there are no methods to compare")
        methods = {str(name): check_matrix(X, min_samples=3, what=f"method {name!r}")
                   for name, X in embeddings_dict.items()}
        sizes = {name: X.shape[0] for name, X in methods.items()}
        if len(set(sizes.values())) > 1:
            described = ", ".join(f"{name!r}: {n}" for name, n in sizes.items())
            raise ValueError(f"the methods cover different numbers of tracks ({described}): compare them on the "
                             "same tracks")
        n = next(iter(sizes.values()))
        columns = check_labels(labels or {}, n)
        rows = [{"method": name, "n_features": X.shape[1],
                 "knn_label_agreement": {c: label_agreement(X, v, center=False) for c, v in columns.items()},
                 "anisotropy": mean_cosine_similarity(X),
                 "effective_dimension": participation_ratio(explained_variance_ratio(X))}
                for name, X in methods.items()]
        terms = [_cka_terms(X) for X in methods.values()]
        matrix: list[list[float | None]] = [[None] * len(terms) for _ in terms]
        for i in range(len(terms)):
            for j in range(i, len(terms)):
                matrix[i][j] = matrix[j][i] = _cka(terms[i], terms[j])
        return {"n_tracks": n, "methods": rows, "cka": {"methods": list(methods), "matrix": matrix}}
