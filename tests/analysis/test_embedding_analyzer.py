"""Planted structure is found: clusters by three methods, an outlier, a near-duplicate, known PCA dimensions and
participation ratios per layer, a known intrinsic dimension; bad input fails with its numbers."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from mess_ai.analysis import embedding_analyzer
from mess_ai.analysis.embedding_analyzer import (
    EmbeddingAnalyzer,
    choose_n_clusters,
    cluster,
    cluster_scores,
    intrinsic_dimension,
    knn_label_accuracy,
    near_duplicates,
    outlier_scores,
    unit_vectors,
)
from tests.helpers.embeddings import equal_axes, planted_blobs


def test_planted_blobs_are_recovered_with_k_chosen_by_silhouette():
    X, labels = planted_blobs(n_per_blob=25, n_blobs=4, dim=32, seed=1)
    analysis = EmbeddingAnalyzer(random_state=0).analyze(X)
    assert analysis.n_clusters == 4 and analysis.clustering["kmeans"]["chosen_by"] == "silhouette"
    assert adjusted_rand_score(labels, analysis.clusters) >= 0.9
    assert analysis.silhouette > 0.5 and sorted(analysis.cluster_sizes) == [25, 25, 25, 25]
    assert analysis.map_2d.shape == (100, 2) and np.isfinite(analysis.map_2d).all()


def test_given_k_and_random_state_make_clustering_reproducible():
    X, labels = planted_blobs(n_per_blob=20, n_blobs=3, dim=16, seed=2)
    first, second = cluster(X, 3, random_state=7), cluster(X, 3, random_state=7)
    assert np.array_equal(first, second)
    assert adjusted_rand_score(labels, first) >= 0.9
    k, scores = choose_n_clusters(X, max_clusters=6)
    assert k == 3 and set(scores) == {2, 3, 4, 5, 6}


def test_planted_outlier_scores_highest_and_is_flagged():
    X, _ = planted_blobs(n_per_blob=20, n_blobs=3, dim=32, seed=3)
    far = np.random.default_rng(9).standard_normal(32) * 10
    X = np.vstack([X, far])
    scores = outlier_scores(X)
    assert np.argmax(scores) == len(X) - 1
    assert EmbeddingAnalyzer(n_clusters=3).analyze(X).outliers == [len(X) - 1]


def test_a_looser_cluster_is_not_a_cluster_of_outliers():
    tight, _ = planted_blobs(n_per_blob=20, n_blobs=2, dim=32, spread=0.05, seed=6)
    loose, _ = planted_blobs(n_per_blob=20, n_blobs=1, dim=32, spread=0.4, seed=7)
    assert EmbeddingAnalyzer(n_clusters=3).analyze(np.vstack([tight, loose])).outliers == []


def test_exact_duplicates_get_finite_outlier_scores():
    X, _ = planted_blobs(n_per_blob=10, n_blobs=2, dim=8, seed=8)
    scores = outlier_scores(np.vstack([X, X[:6], X[:6]]))
    assert np.isfinite(scores).all() and scores.max() < 1.5
    assert np.array_equal(outlier_scores(np.vstack([X[:1]] * 4 + [X[1:2]])), np.ones(5))


def test_planted_near_duplicate_is_the_only_pair_found():
    X, _ = planted_blobs(n_per_blob=20, n_blobs=3, dim=32, seed=4)
    copy = X[5] + 1e-3 * np.random.default_rng(0).standard_normal(32)
    X = np.vstack([X, copy])
    pairs = near_duplicates(X, min_similarity=0.99)
    assert [(i, j) for i, j, _ in pairs] == [(5, len(X) - 1)]
    assert pairs[0][2] > 0.999
    assert EmbeddingAnalyzer().analyze(X).near_duplicates[0][:2] == (5, len(X) - 1)


@pytest.mark.parametrize("dimension", [2, 5, 8])
def test_intrinsic_dimension_of_a_linear_subspace_is_within_one(dimension):
    rng = np.random.default_rng(dimension)
    basis, _ = np.linalg.qr(rng.standard_normal((64, dimension)))
    X = rng.standard_normal((800, dimension)) @ basis.T + 3.0
    assert abs(intrinsic_dimension(X) - dimension) <= 1


def test_intrinsic_dimension_of_a_curved_manifold_is_within_one():
    from sklearn.datasets import make_swiss_roll

    roll, _ = make_swiss_roll(800, random_state=0)
    basis, _ = np.linalg.qr(np.random.default_rng(0).standard_normal((40, 3)))
    assert abs(intrinsic_dimension(roll @ basis.T) - 2) <= 1


def test_intrinsic_dimension_is_none_without_enough_distinct_points():
    assert intrinsic_dimension(np.ones((5, 4))) is None


def test_knn_label_accuracy_separates_blobs_and_not_shuffled_labels():
    X, labels = planted_blobs(n_per_blob=15, n_blobs=3, dim=16, seed=5)
    assert knn_label_accuracy(X, labels) == 1.0
    shuffled = np.random.default_rng(0).permutation(labels)
    assert knn_label_accuracy(X, shuffled) < 0.7
    assert knn_label_accuracy(X, np.zeros(len(X))) is None


def test_more_clusters_than_tracks_names_the_numbers():
    X, _ = planted_blobs(n_per_blob=2, n_blobs=2, dim=8)
    with pytest.raises(ValueError, match=r"clusters is 8 for 4 tracks; valid values are 2 to n_tracks - 1 = 3"):
        EmbeddingAnalyzer(n_clusters=8).analyze(X)
    with pytest.raises(ValueError, match="number of clusters is 1"):
        cluster(X, 1)


def test_one_track_is_refused():
    with pytest.raises(ValueError, match="X has 1 samples; at least 3 are needed"):
        EmbeddingAnalyzer().analyze(np.ones((1, 8)))


def test_nan_is_refused_with_its_row():
    X, _ = planted_blobs(n_per_blob=5, n_blobs=2, dim=8)
    X[3, 2] = np.nan
    with pytest.raises(ValueError, match=r"non-finite values \(NaN or inf\) in 1 of 10 rows \(first: row 3\)"):
        EmbeddingAnalyzer().analyze(X)


def test_wrong_shape_and_identical_tracks_are_refused():
    with pytest.raises(ValueError, match=r"must be 2-D \[n_samples, n_features\]; got shape \[4, 3, 2\]"):
        EmbeddingAnalyzer().analyze(np.zeros((4, 3, 2)))
    with pytest.raises(ValueError, match="all 4 tracks have identical embeddings"):
        EmbeddingAnalyzer().analyze(np.ones((4, 3)))


# --- analyze_dimensions ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("k", [1, 4, 10])
def test_dimensions_of_k_equal_axes(k):
    result = EmbeddingAnalyzer().analyze_dimensions(equal_axes(k, dim=16))
    assert np.allclose(result["explained_variance_ratio"][:k], 1 / k)
    assert result["pca_components_90"] == int(np.ceil(0.9 * k))
    assert result["pca_components_95"] == int(np.ceil(0.95 * k))
    assert result["participation_ratio"] == pytest.approx(k)


def test_one_dominant_axis_has_participation_ratio_near_one():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((200, 8)) * [30, 1, 1, 1, 1, 1, 1, 1]
    result = EmbeddingAnalyzer().analyze_dimensions(X)
    assert result["participation_ratio"] < 1.1 and result["pca_components_90"] == 1


def test_dimensions_are_reported_for_each_of_13_layers():
    # Layer i spans i + 1 equal axes (layer 12: 13 of them), so each layer's numbers are known.
    features = np.stack([equal_axes(i + 1, dim=16, n_rows=26, seed=i) for i in range(13)], axis=1)
    per_layer = EmbeddingAnalyzer().analyze_dimensions(features)
    assert [d["layer"] for d in per_layer] == list(range(13))
    assert [round(d["participation_ratio"], 6) for d in per_layer] == list(range(1, 14))
    assert [d["pca_components_95"] for d in per_layer] == [int(np.ceil(0.95 * (i + 1))) for i in range(13)]
    assert all(d["n_tracks"] == 26 and d["n_features"] == 16 for d in per_layer)


def test_a_layer_without_variance_has_undefined_dimensions_not_nan():
    features = np.stack([equal_axes(3, dim=4), np.ones((8, 4))], axis=1)
    constant = EmbeddingAnalyzer().analyze_dimensions(features)[1]
    assert constant["pca_components_90"] is None and constant["participation_ratio"] is None
    assert constant["intrinsic_dimension"] is None and not np.any(constant["explained_variance_ratio"])


def test_bad_features_name_the_shape_layer_and_row():
    analyzer = EmbeddingAnalyzer()
    with pytest.raises(ValueError, match=r"\[n_tracks, n_layers, n_features\]; got shape \[2, 3, 4, 5\]"):
        analyzer.analyze_dimensions(np.zeros((2, 3, 4, 5)))
    features = np.random.default_rng(0).standard_normal((10, 3, 4))
    features[2, 1, 0] = np.inf
    with pytest.raises(ValueError, match=r"layer 1 of features has non-finite values \(NaN or inf\) in 1 of 10 rows "
                                         r"\(first: row 2\)"):
        analyzer.analyze_embedding_quality(features)
    with pytest.raises(ValueError, match="layer 0 of features has 2 samples; at least 3 are needed"):
        analyzer.analyze_dimensions(features[:2])


# --- analyze_embedding_quality --------------------------------------------------------------------------------

def test_quality_finds_norms_constant_dimensions_anisotropy_outliers_and_duplicates():
    X, _ = planted_blobs(n_per_blob=15, n_blobs=3, dim=16, seed=3)
    X = np.vstack([X, X[4] + 1e-4, np.random.default_rng(1).standard_normal(16) * 10])
    X[:, 5] = 2.0  # a dead feature
    quality = EmbeddingAnalyzer().analyze_embedding_quality(X)
    norms = np.linalg.norm(X, axis=1)
    assert quality["norm"] == pytest.approx({"mean": norms.mean(), "std": norms.std(), "min": norms.min(),
                                             "max": norms.max()})
    assert quality["constant_dimensions"] == 1
    assert quality["outliers"] == [len(X) - 1] and quality["outlier_scores"].shape == (len(X),)
    assert [(i, j) for i, j, _ in quality["near_duplicates"]] == [(4, len(X) - 2)]
    shifted = EmbeddingAnalyzer().analyze_embedding_quality(X + 100.0)  # a shared component, as MERT has
    assert shifted["anisotropy"] > 0.99 > 0.5 > abs(quality["anisotropy"])


def test_quality_per_layer_tells_a_collapsed_layer_apart():
    X, _ = planted_blobs(n_per_blob=10, n_blobs=3, dim=16, seed=4)
    collapsed = 50.0 + 0.01 * X  # every track nearly the same direction
    per_layer = EmbeddingAnalyzer().analyze_embedding_quality(np.stack([X, collapsed], axis=1))
    assert [q["layer"] for q in per_layer] == [0, 1]
    assert per_layer[1]["anisotropy"] > 0.99 and per_layer[0]["anisotropy"] < 0.5


# --- perform_clustering ---------------------------------------------------------------------------------------

def test_three_clustering_methods_recover_planted_blobs_and_isolate_the_outlier():
    X, labels = planted_blobs(n_per_blob=20, n_blobs=4, dim=32, spread=0.2, seed=1)
    X = np.vstack([X, np.random.default_rng(9).standard_normal(32) * 10])
    result = EmbeddingAnalyzer().perform_clustering(X)
    kmeans, ward, dbscan = result["kmeans"], result["agglomerative"], result["dbscan"]
    assert result["n_tracks"] == 81
    # The silhouette puts the far track in a cluster of its own; Ward follows k; DBSCAN calls it noise.
    assert kmeans["chosen_by"] == "silhouette" and set(kmeans["silhouette_by_k"]) == set(range(2, 11))
    assert kmeans["n_clusters"] == ward["n_clusters"] == 5 and kmeans["sizes"] == ward["sizes"] == [20, 20, 20, 20, 1]
    assert kmeans["labels"][80] == ward["labels"][80] == 4 and kmeans["exemplars"][4] == ward["exemplars"][4] == 80
    assert dbscan["n_clusters"] == 4 and dbscan["labels"][80] == -1 and dbscan["n_noise"] >= 1
    assert dbscan["eps"] > 0 and dbscan["min_samples"] == 5
    for method in (kmeans, ward, dbscan):
        assert adjusted_rand_score(labels, method["labels"][:80]) >= 0.9
        assert method["silhouette"] > 0.5 and method["calinski_harabasz"] > 10 and method["davies_bouldin"] < 1
        assert sum(method["sizes"]) + method.get("n_noise", 0) == 81
        assert method["sizes"] == sorted(method["sizes"], reverse=True)


def test_exemplar_is_the_member_nearest_its_cluster_centre():
    X, _ = planted_blobs(n_per_blob=12, n_blobs=3, dim=16, seed=2)
    kmeans = EmbeddingAnalyzer(n_clusters=3).perform_clustering(X)["kmeans"]
    Z = unit_vectors(X)
    for c, exemplar in enumerate(kmeans["exemplars"]):
        members = np.flatnonzero(kmeans["labels"] == c)
        assert exemplar in members
        assert exemplar == members[np.argmax(Z[members] @ Z[members].mean(axis=0))]


def test_clustering_is_reproducible_and_k_can_be_given_per_call():
    X, labels = planted_blobs(n_per_blob=15, n_blobs=3, dim=16, seed=6)
    analyzer = EmbeddingAnalyzer(random_state=3)
    first, second = analyzer.perform_clustering(X, n_clusters=10), analyzer.perform_clustering(X, n_clusters=10)
    assert first["kmeans"]["n_clusters"] == 10 and first["kmeans"]["chosen_by"] == "given"
    for method in ("kmeans", "agglomerative", "dbscan"):
        assert np.array_equal(first[method]["labels"], second[method]["labels"])
    assert first["agglomerative"]["n_clusters"] == 10


def test_clustering_refuses_bad_k_and_identical_tracks_and_skips_pairwise_methods_when_large(monkeypatch):
    X, _ = planted_blobs(n_per_blob=5, n_blobs=2, dim=8)
    with pytest.raises(ValueError, match=r"number of clusters is 10 for 10 tracks; valid values are 2 to "
                                         r"n_tracks - 1 = 9"):
        EmbeddingAnalyzer().perform_clustering(X, n_clusters=10)
    with pytest.raises(ValueError, match="all 5 tracks have identical embeddings"):
        EmbeddingAnalyzer().perform_clustering(np.ones((5, 3)))
    monkeypatch.setattr(embedding_analyzer, "MAX_PAIRWISE_TRACKS", 8)
    result = EmbeddingAnalyzer(n_clusters=2).perform_clustering(X)
    assert result["kmeans"]["n_clusters"] == 2
    assert result["dbscan"] == result["agglomerative"] == {
        "skipped": "10 tracks: agglomerative clustering and DBSCAN need pairwise distances, done up to 8 tracks"}


def test_cluster_scores_are_none_when_undefined():
    Z = unit_vectors(planted_blobs(n_per_blob=3, n_blobs=2, dim=4)[0])
    assert cluster_scores(Z, np.zeros(6, dtype=int)) == dict.fromkeys(
        ("silhouette", "calinski_harabasz", "davies_bouldin"))
    assert cluster_scores(Z, np.arange(6)) == dict.fromkeys(("silhouette", "calinski_harabasz", "davies_bouldin"))
