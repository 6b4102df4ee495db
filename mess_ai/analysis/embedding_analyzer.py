"""Structure of an embedding space: quality (norms, anisotropy, outliers, near-duplicates), dimension (PCA,
participation ratio, TwoNN) and clusters (k-means, agglomerative, DBSCAN), per layer where asked.

Functions take ``X: [n_samples, n_features]``; the ``EmbeddingAnalyzer`` methods also take
``features: [n_tracks, n_layers, hidden]`` and then answer per layer. Cosine-based steps work on centred,
L2-normalised vectors (``unit_vectors``): MERT embeddings share a large common component that would otherwise
make every pair similar.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

from mess_ai.analysis.preprocessing import check_features, check_matrix, l2_normalize

# Similarity matrices are computed in row blocks of at most this many entries (128 MB of float64), so a large
# collection never needs its whole n x n matrix in memory.
_BLOCK_ENTRIES = 1 << 24
# Agglomerative clustering and DBSCAN hold pairwise distances (Ward: n^2 / 2 of them, 1.6 GB at this size);
# above it they are skipped rather than exhaust memory.
MAX_PAIRWISE_TRACKS = 20000
# Share of tracks that are DBSCAN core points under the chosen eps (see ``dbscan_eps``).
_DBSCAN_CORE_QUANTILE = 0.9
_CLUSTER_METRICS = ("silhouette", "calinski_harabasz", "davies_bouldin")


def unit_vectors(X: np.ndarray) -> np.ndarray:
    """X [n, d] centred on its mean and L2-normalised: float64 [n, d]."""
    X = check_matrix(X)
    return l2_normalize(X - X.mean(axis=0))


def _row_blocks(n: int) -> Iterator[slice]:
    step = max(1, _BLOCK_ENTRIES // max(n, 1))
    for start in range(0, n, step):
        yield slice(start, min(start + step, n))


def each_layer(features: np.ndarray, analyse: Callable[[np.ndarray], dict], min_samples: int
               ) -> dict | list[dict]:
    """``analyse(X)`` for X [n, d]; for [n, n_layers, d], a list with ``{"layer": i, **analyse(layer i)}``."""
    features = check_features(features, min_samples)
    if features.ndim == 2:
        return analyse(features)
    return [{"layer": layer, **analyse(features[:, layer])} for layer in range(features.shape[1])]


def nearest_neighbours(Z: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """For unit rows Z [n, d]: indices int [n, k] and cosine similarities float [n, k] of each row's k most
    similar other rows, most similar first."""
    n = Z.shape[0]
    if not 1 <= k <= n - 1:
        raise ValueError(f"k is {k}; valid values are 1 to n_samples - 1 = {n - 1}")
    indices = np.empty((n, k), dtype=np.int64)
    sims = np.empty((n, k))
    for block in _row_blocks(n):
        S = Z[block] @ Z.T
        S[np.arange(S.shape[0]), np.arange(block.start, block.stop)] = -np.inf
        top = np.argpartition(-S, k - 1, axis=1)[:, :k]
        top_sims = np.take_along_axis(S, top, axis=1)
        order = np.argsort(-top_sims, axis=1, kind="stable")
        indices[block] = np.take_along_axis(top, order, axis=1)
        sims[block] = np.take_along_axis(top_sims, order, axis=1)
    return indices, sims


def mean_cosine_similarity(X: np.ndarray) -> float:
    """Mean cosine similarity of the raw (uncentred) rows of X [n, d] over all pairs i < j: how much the vectors
    share one direction (anisotropy). An all-zero row counts as similarity 0."""
    X = check_matrix(X, min_samples=2)
    n = X.shape[0]
    Z = l2_normalize(X)
    total = Z.sum(axis=0)
    # sum over i != j of z_i . z_j = |sum z|^2 - sum |z_i|^2, without the n x n matrix.
    return float((total @ total - np.sum(Z * Z)) / (n * (n - 1)))


def check_n_clusters(n_clusters: int, n_samples: int) -> None:
    if not 2 <= n_clusters <= n_samples - 1:
        raise ValueError(f"number of clusters is {n_clusters} for {n_samples} tracks; valid values are "
                         f"2 to n_tracks - 1 = {n_samples - 1}")


def by_size(labels: np.ndarray) -> np.ndarray:
    """Cluster labels int [n] renumbered 0, 1, ... by decreasing cluster size (ties: lower old label first);
    negative labels (DBSCAN noise) stay -1."""
    labels = np.asarray(labels)
    ids, sizes = np.unique(labels[labels >= 0], return_counts=True)
    new = np.empty(len(ids), dtype=np.int64)
    new[np.argsort(-sizes, kind="stable")] = np.arange(len(ids))
    out = np.full(len(labels), -1, dtype=np.int64)
    clustered = labels >= 0
    out[clustered] = new[np.searchsorted(ids, labels[clustered])]
    return out


def cluster(X: np.ndarray, n_clusters: int, random_state: int = 0) -> np.ndarray:
    """k-means on the unit vectors of X [n, d]: cluster labels int [n], numbered by decreasing size."""
    from sklearn.cluster import KMeans

    Z = unit_vectors(check_matrix(X, min_samples=3))
    check_n_clusters(n_clusters, Z.shape[0])
    with warnings.catch_warnings():
        # Fewer distinct points than clusters is reported by the silhouette being undefined, not a warning.
        warnings.simplefilter("ignore")
        labels = KMeans(n_clusters=n_clusters, n_init=10, random_state=random_state).fit_predict(Z)
    return by_size(labels)


def unit_silhouette(Z: np.ndarray, labels: np.ndarray, random_state: int = 0, max_samples: int = 2000
                    ) -> float | None:
    """Mean cosine silhouette of ``labels`` [n] on rows Z [n, d] as given; None when undefined (fewer than 2
    groups, or as many groups as rows). Above ``max_samples`` rows a random sample of that size is scored."""
    from sklearn.metrics import silhouette_score

    if len(labels) > max_samples:
        rows = np.random.default_rng(random_state).choice(len(labels), max_samples, replace=False)
        Z, labels = Z[rows], labels[rows]
    if not 2 <= len(np.unique(labels)) <= len(labels) - 1:
        return None
    return float(silhouette_score(Z, labels, metric="cosine"))


def silhouette(X: np.ndarray, labels: np.ndarray, random_state: int = 0, max_samples: int = 2000) -> float | None:
    """``unit_silhouette`` on the centred unit vectors of X [n, d]."""
    return unit_silhouette(unit_vectors(X), np.asarray(labels), random_state, max_samples)


def cluster_scores(Z: np.ndarray, labels: np.ndarray, random_state: int = 0, max_samples: int = 2000
                   ) -> dict[str, float | None]:
    """Cosine silhouette (higher is better, in [-1, 1]), Calinski-Harabasz (higher is better) and Davies-Bouldin
    (lower is better) of ``labels`` int [n] on unit rows Z [n, d]; each None where undefined (fewer than 2
    clusters, or as many clusters as rows)."""
    from sklearn.metrics import calinski_harabasz_score, davies_bouldin_score

    labels = np.asarray(labels)
    if not 2 <= len(np.unique(labels)) <= len(labels) - 1:
        return dict.fromkeys(_CLUSTER_METRICS)
    with warnings.catch_warnings():
        # Davies-Bouldin divides by zero for coincident centroids; the non-finite result becomes None below.
        warnings.simplefilter("ignore")
        scores = {"silhouette": unit_silhouette(Z, labels, random_state, max_samples),
                  "calinski_harabasz": float(calinski_harabasz_score(Z, labels)),
                  "davies_bouldin": float(davies_bouldin_score(Z, labels))}
    return {name: v if v is not None and np.isfinite(v) else None for name, v in scores.items()}


def choose_n_clusters(X: np.ndarray, max_clusters: int = 10, random_state: int = 0) -> tuple[int, dict[int, float]]:
    """The number of clusters (2 to min(max_clusters, n - 1)) with the best silhouette, and every k's score."""
    X = check_matrix(X, min_samples=3)
    scores: dict[int, float] = {}
    for k in range(2, min(max_clusters, X.shape[0] - 1) + 1):
        score = silhouette(X, cluster(X, k, random_state), random_state)
        if score is not None:
            scores[k] = score
    if not scores:
        return 2, scores
    return max(scores, key=lambda k: (scores[k], -k)), scores


def dbscan_eps(Z: np.ndarray, min_samples: int) -> float:
    """DBSCAN's radius for unit rows Z [n, d]: the 90th percentile of each row's distance to its
    (min_samples - 1)-th nearest other row, so that about 90 % of the tracks are core points and only the
    sparsest tenth can become noise, whatever the scale of the space."""
    from sklearn.neighbors import NearestNeighbors

    # Querying the fitted rows returns each row itself (distance 0) first.
    distances, _ = NearestNeighbors(n_neighbors=min_samples).fit(Z).kneighbors(Z)
    # eps must be positive; a radius of 0 arises only when the neighbours are exact duplicates.
    return max(float(np.quantile(distances[:, -1], _DBSCAN_CORE_QUANTILE)), 1e-9)


def describe_clusters(Z: np.ndarray, labels: np.ndarray, random_state: int = 0) -> dict:
    """Sizes, an exemplar per cluster and the scores of ``cluster_scores`` for labels int [n] on unit rows Z [n, d]
    (labels numbered 0.. by size; -1 = noise, left out of the scores).

    The exemplar is the cosine medoid: the member with the highest summed similarity to the other members, which
    is the member most aligned with the cluster's mean.
    """
    labels = np.asarray(labels)
    clustered = labels >= 0
    ids = np.unique(labels[clustered])
    exemplars = []
    for c in ids:
        members = np.flatnonzero(labels == c)
        exemplars.append(int(members[np.argmax(Z[members] @ Z[members].mean(axis=0))]))
    return {"labels": labels, "n_clusters": len(ids), "sizes": [int(np.sum(labels == c)) for c in ids],
            "exemplars": exemplars, **cluster_scores(Z[clustered], labels[clustered], random_state)}


def outlier_scores(X: np.ndarray, n_neighbors: int = 5) -> np.ndarray:
    """Local outlier factor float [n] of each row of X [n, d] among its nearest neighbours, on the unit vectors:
    about 1 inside a group of any density, well above 1 for a track far from every group.

    The local factor rather than a plain neighbour distance, because genres differ in spread: a loose cluster's
    members would otherwise all look isolated. Exact duplicates are scored once (as sklearn's estimate breaks on
    them); fewer than 3 distinct rows score 1.
    """
    from sklearn.neighbors import LocalOutlierFactor

    Z = unit_vectors(check_matrix(X, min_samples=3))
    distinct, inverse = np.unique(Z, axis=0, return_inverse=True)
    if distinct.shape[0] < 3:
        return np.ones(Z.shape[0])
    k = min(n_neighbors, distinct.shape[0] - 1)
    factor = -LocalOutlierFactor(n_neighbors=k).fit(distinct).negative_outlier_factor_
    return factor[inverse.reshape(-1)]


def near_duplicates(X: np.ndarray, min_similarity: float = 0.99) -> list[tuple[int, int, float]]:
    """Pairs (i, j, cosine) with i < j whose centred cosine similarity is at least ``min_similarity``,
    most similar first."""
    if not -1.0 <= min_similarity <= 1.0:
        raise ValueError(f"min_similarity is {min_similarity}; it must lie in [-1, 1]")
    Z = unit_vectors(check_matrix(X, min_samples=2))
    pairs = []
    for block in _row_blocks(Z.shape[0]):
        S = Z[block] @ Z.T
        rows, cols = np.nonzero(S >= min_similarity)
        rows = rows + block.start
        keep = rows < cols
        pairs.extend(zip(rows[keep].tolist(), cols[keep].tolist(), S[rows[keep] - block.start, cols[keep]].tolist()))
    pairs.sort(key=lambda p: (-p[2], p[0], p[1]))
    return pairs


def intrinsic_dimension(X: np.ndarray) -> float | None:
    """TwoNN estimate (Facco et al. 2017) of the intrinsic dimension of X [n, d]: the maximum-likelihood fit of
    the ratio of each point's second to first nearest-neighbour distance. Exact duplicates are left out; None
    when fewer than 3 distinct points remain or every ratio is 1."""
    from sklearn.neighbors import NearestNeighbors

    X = check_matrix(X, min_samples=3)
    X = np.unique(X, axis=0)
    if X.shape[0] < 3:
        return None
    distances, _ = NearestNeighbors(n_neighbors=3).fit(X).kneighbors(X)
    log_mu = np.log(distances[:, 2] / distances[:, 1])
    total = float(log_mu.sum())
    if total <= 0:
        return None
    return (len(log_mu) - 1) / total


def explained_variance_ratio(X: np.ndarray) -> np.ndarray:
    """Fraction of the variance of X [n, d] along each principal axis, largest first: float [min(n - 1, d)]
    (zeros when X has no variance)."""
    X = check_matrix(X, min_samples=2)
    centred = X - X.mean(axis=0)
    # Eigenvalues of the smaller of the two Gram matrices (the squared singular values): several times faster than
    # an SVD of an n x d matrix, and ratios do not need the precision of the small ones.
    gram = centred.T @ centred if X.shape[1] <= X.shape[0] else centred @ centred.T
    variance = np.clip(np.linalg.eigvalsh(gram)[::-1], 0.0, None)[: min(X.shape[0] - 1, X.shape[1])]
    total = variance.sum()
    return variance / total if total > 0 else np.zeros_like(variance)


def components_for(ratios: np.ndarray, fraction: float) -> int | None:
    """Principal axes needed for ``fraction`` of the variance, given ``explained_variance_ratio``; None when
    there is no variance."""
    ratios = np.asarray(ratios)
    if not ratios.sum() > 0:
        return None
    return int(min(np.searchsorted(np.cumsum(ratios), fraction - 1e-12) + 1, len(ratios)))


def participation_ratio(ratios: np.ndarray) -> float | None:
    """(sum of variances)^2 / sum of squared variances along the principal axes, from
    ``explained_variance_ratio``: k for k axes of equal variance, near 1 when one axis dominates. None when
    there is no variance."""
    ratios = np.asarray(ratios)
    total = ratios.sum()
    if not total > 0:
        return None
    return float(total ** 2 / np.sum(ratios ** 2))


def pca_map(X: np.ndarray) -> np.ndarray:
    """The first two principal coordinates of X [n, d]: float [n, 2] (zeros where X has less than 2 dimensions
    of variance). Signs are fixed so that reruns give the same picture."""
    X = check_matrix(X, min_samples=1)
    centred = X - X.mean(axis=0)
    u, s, vt = np.linalg.svd(centred, full_matrices=False)
    coords = np.zeros((X.shape[0], 2))
    m = min(2, len(s))
    coords[:, :m] = u[:, :m] * s[:m]
    signs = np.sign(vt[:m, :][np.arange(m), np.argmax(np.abs(vt[:m, :]), axis=1)])
    coords[:, :m] *= np.where(signs == 0, 1.0, signs)
    return coords


def knn_label_accuracy(X: np.ndarray, labels: np.ndarray, n_neighbors: int = 5, center: bool = True
                       ) -> float | None:
    """Leave-one-out accuracy of a cosine k-nearest-neighbour vote predicting ``labels`` [n] from X [n, d]
    (ties go to the nearest neighbour's label). None when there are fewer than 2 classes or 3 samples.
    ``center``: compare the centred vectors (as similarity search does), else the vectors as given.

    k is ``n_neighbors``, lowered to the median class size minus one: in small collections a larger vote is
    won by the other classes whatever the embedding.
    """
    labels = np.asarray(labels)
    X = check_matrix(X)
    if len(labels) != X.shape[0]:
        raise ValueError(f"{len(labels)} labels for {X.shape[0]} samples")
    _, counts = np.unique(labels, return_counts=True)
    if X.shape[0] < 3 or len(counts) < 2:
        return None
    Z = unit_vectors(X) if center else l2_normalize(X)
    k = max(1, min(n_neighbors, Z.shape[0] - 1, int(np.median(counts)) - 1))
    neighbours, _ = nearest_neighbours(Z, k)
    correct = 0
    for i, row in enumerate(neighbours):
        votes: dict = {}
        for rank, j in enumerate(row):
            count, first = votes.get(labels[j], (0, rank))
            votes[labels[j]] = (count + 1, first)
        predicted = max(votes, key=lambda lab: (votes[lab][0], -votes[lab][1]))
        correct += predicted == labels[i]
    return correct / Z.shape[0]


@dataclass(frozen=True, eq=False)
class EmbeddingAnalysis:
    """What ``EmbeddingAnalyzer.analyze`` finds in X [n_tracks, n_features]."""

    quality: dict  # analyze_embedding_quality(X)
    dimensions: dict  # analyze_dimensions(X)
    clustering: dict  # perform_clustering(X)
    map_2d: np.ndarray  # float [n_tracks, 2]: first principal coordinates of the centred unit vectors
    map_variance: np.ndarray  # float [<= 2]: fraction of their variance along each map axis

    @property
    def n_clusters(self) -> int:
        return self.clustering["kmeans"]["n_clusters"]

    @property
    def clusters(self) -> np.ndarray:
        """k-means labels int [n_tracks], 0 = largest cluster."""
        return self.clustering["kmeans"]["labels"]

    @property
    def silhouette(self) -> float | None:
        return self.clustering["kmeans"]["silhouette"]

    @property
    def cluster_sizes(self) -> list[int]:
        return self.clustering["kmeans"]["sizes"]

    @property
    def outliers(self) -> list[int]:
        return self.quality["outliers"]

    @property
    def near_duplicates(self) -> list[tuple[int, int, float]]:
        return self.quality["near_duplicates"]


@dataclass(frozen=True)
class EmbeddingAnalyzer:
    """Quality, dimension and clusters of track embeddings; ``random_state`` makes every result reproducible."""

    n_clusters: int | None = None
    max_clusters: int = 10
    n_neighbors: int = 5
    # sklearn's own cut-off for "auto" contamination.
    outlier_threshold: float = 1.5
    duplicate_similarity: float = 0.99
    random_state: int = 0

    def analyze_embedding_quality(self, features: np.ndarray) -> dict | list[dict]:
        """Health of X [n_tracks, n_features] (or of each layer of [n_tracks, n_layers, hidden], as a list):
        ``norm`` (mean, std, min, max of the vector lengths), ``constant_dimensions`` (features equal for every
        track), ``anisotropy`` (mean raw cosine similarity of track pairs; near 1 when a shared component
        dominates), ``outlier_scores`` float [n_tracks] (local outlier factor) and ``outliers`` (indices scoring
        above ``outlier_threshold``, most isolated first), ``near_duplicates`` ((i, j, centred cosine) at or above
        ``duplicate_similarity``)."""
        return each_layer(features, self._quality, min_samples=3)

    def _quality(self, X: np.ndarray) -> dict:
        norms = np.linalg.norm(X, axis=1)
        scores = outlier_scores(X, self.n_neighbors)
        return {
            "n_tracks": X.shape[0],
            "n_features": X.shape[1],
            "norm": {"mean": float(norms.mean()), "std": float(norms.std()), "min": float(norms.min()),
                     "max": float(norms.max())},
            "constant_dimensions": int(np.sum(np.ptp(X, axis=0) == 0)),
            "anisotropy": mean_cosine_similarity(X),
            "outlier_threshold": self.outlier_threshold,
            "outlier_scores": scores,
            "outliers": [int(i) for i in np.argsort(-scores, kind="stable") if scores[i] > self.outlier_threshold],
            "near_duplicate_similarity": self.duplicate_similarity,
            "near_duplicates": near_duplicates(X, self.duplicate_similarity),
        }

    def analyze_dimensions(self, features: np.ndarray) -> dict | list[dict]:
        """PCA of X [n_tracks, n_features] (or of each layer of [n_tracks, n_layers, hidden], as a list):
        ``explained_variance_ratio`` float [min(n_tracks - 1, n_features)], ``pca_components_90`` and
        ``pca_components_95`` (axes needed for 90 % / 95 % of the variance), ``participation_ratio`` (effective
        number of axes), ``intrinsic_dimension`` (TwoNN). Undefined values (no variance) are None."""
        return each_layer(features, self._dimensions, min_samples=3)

    @staticmethod
    def _dimensions(X: np.ndarray) -> dict:
        ratios = explained_variance_ratio(X)
        return {"n_tracks": X.shape[0], "n_features": X.shape[1], "explained_variance_ratio": ratios,
                "pca_components_90": components_for(ratios, 0.9), "pca_components_95": components_for(ratios, 0.95),
                "participation_ratio": participation_ratio(ratios), "intrinsic_dimension": intrinsic_dimension(X)}

    def perform_clustering(self, features: np.ndarray, n_clusters: int | None = None) -> dict:
        """k-means, agglomerative (Ward) and DBSCAN on the centred unit vectors of X [n_tracks, n_features].

        k for k-means and agglomerative: ``n_clusters``, else ``self.n_clusters``, else the best cosine
        silhouette over 2 to ``max_clusters``. DBSCAN finds its own number, with ``min_samples`` =
        ``n_neighbors`` and eps from ``dbscan_eps``. Returns ``{"n_tracks", "kmeans", "agglomerative",
        "dbscan"}``; each method has ``labels`` int [n_tracks] (0 = largest cluster; -1 = DBSCAN noise),
        ``n_clusters``, ``sizes``, ``exemplars`` (a track index per cluster) and the ``cluster_scores``; k-means
        adds ``chosen_by`` ("given" or "silhouette") and ``silhouette_by_k``, DBSCAN ``eps``, ``min_samples`` and
        ``n_noise``. Above ``MAX_PAIRWISE_TRACKS`` tracks agglomerative and DBSCAN are ``{"skipped": reason}``.
        ValueError for fewer than 3 tracks, identical tracks or a k outside 2 to n_tracks - 1.
        """
        from sklearn.cluster import DBSCAN, AgglomerativeClustering

        X = check_matrix(features, min_samples=3, what="features")
        n = X.shape[0]
        if np.all(X == X[0]):
            raise ValueError(f"all {n} tracks have identical embeddings: there is no structure to analyse")
        k = n_clusters if n_clusters is not None else self.n_clusters
        if k is not None:
            check_n_clusters(k, n)
            chosen_by, by_k = "given", {}
        else:
            k, by_k = choose_n_clusters(X, self.max_clusters, self.random_state)
            chosen_by = "silhouette"
        Z = unit_vectors(X)
        kmeans = {**describe_clusters(Z, cluster(X, k, self.random_state), self.random_state),
                  "chosen_by": chosen_by, "silhouette_by_k": by_k}
        if chosen_by == "silhouette" and not by_k:
            kmeans["note"] = "no number of clusters gives a defined silhouette; 2 clusters used"
        result = {"n_tracks": n, "kmeans": kmeans}
        if n > MAX_PAIRWISE_TRACKS:
            skipped = {"skipped": f"{n} tracks: agglomerative clustering and DBSCAN need pairwise distances, "
                                  f"done up to {MAX_PAIRWISE_TRACKS} tracks"}
            return {**result, "agglomerative": skipped, "dbscan": skipped}
        ward = AgglomerativeClustering(n_clusters=k, linkage="ward").fit_predict(Z)
        min_samples = min(self.n_neighbors, n - 1)
        eps = dbscan_eps(Z, min_samples)
        density = by_size(DBSCAN(eps=eps, min_samples=min_samples).fit_predict(Z))
        return {**result,
                "agglomerative": {**describe_clusters(Z, by_size(ward), self.random_state), "linkage": "ward"},
                "dbscan": {**describe_clusters(Z, density, self.random_state), "eps": eps,
                           "min_samples": min_samples, "n_noise": int(np.sum(density < 0))}}

    def analyze(self, X: np.ndarray) -> EmbeddingAnalysis:
        """Quality, dimensions and clusters of X [n_tracks, n_features], and a 2-D map of it."""
        X = check_matrix(X, min_samples=3)
        clustering = self.perform_clustering(X)
        Z = unit_vectors(X)
        return EmbeddingAnalysis(self.analyze_embedding_quality(X), self.analyze_dimensions(X), clustering,
                                 pca_map(Z), explained_variance_ratio(Z)[:2])
