"""Diversity (Vendi counts distinct items, pairwise cosine distance), coverage of labels (spread, centroid distances,
under-covered labels), and the comparison of embedding methods (k-NN agreement, anisotropy, effective dimension,
linear CKA)."""

from __future__ import annotations

import numpy as np
import pytest

from mess_ai.analysis.embedding_analyzer import components_for, explained_variance_ratio, mean_cosine_similarity
from mess_ai.analysis.embedding_diversity import (
    DiversityAnalyzer,
    linear_cka,
    pairwise_similarities,
    representations,
    vendi_score,
)
from tests.helpers.embeddings import equal_axes, layered, planted_blobs


@pytest.mark.parametrize("k", [1, 2, 7, 40])
def test_vendi_of_k_identical_is_one(k):
    X = np.tile(np.random.default_rng(k).standard_normal(16), (k, 1))
    assert vendi_score(X) == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize("k", [1, 3, 12])
def test_vendi_of_k_orthogonal_is_k(k):
    basis, _ = np.linalg.qr(np.random.default_rng(k).standard_normal((32, k)))
    X = basis.T * np.arange(1, k + 1)[:, None]  # lengths do not matter under the cosine kernel
    assert vendi_score(X) == pytest.approx(k, rel=1e-9)


def test_vendi_uses_the_smaller_gram_matrix_with_the_same_result():
    X = np.random.default_rng(0).standard_normal((300, 8))  # n > d: the d x d matrix is decomposed
    Z = X / np.linalg.norm(X, axis=1, keepdims=True)
    eigenvalues = np.linalg.eigvalsh(Z @ Z.T / len(Z))
    eigenvalues = eigenvalues[eigenvalues > 1e-12]
    assert vendi_score(X) == pytest.approx(float(np.exp(-np.sum(eigenvalues * np.log(eigenvalues)))), rel=1e-9)


def test_vendi_refuses_zero_rows_and_nan():
    with pytest.raises(ValueError, match=r"1 all-zero rows \(first: row 1\)"):
        vendi_score(np.array([[1.0, 0.0], [0.0, 0.0]]))
    with pytest.raises(ValueError, match="non-finite"):
        vendi_score(np.array([[1.0, np.nan]]))


def test_diversity_analyzer_reports_finite_scores_per_cluster():
    X, labels = planted_blobs(n_per_blob=10, n_blobs=3, dim=16)
    result = DiversityAnalyzer().analyze(X, labels)
    assert 2.0 < result["vendi_score"] <= 16
    assert set(result["vendi_score_by_cluster"]) == {0, 1, 2}
    assert result["pairwise_similarity"]["pairs"] == 30 * 29 // 2
    assert -1 <= result["pairwise_similarity"]["quantiles"]["0.01"] <= result["pairwise_similarity"]["mean"] <= 1
    with pytest.raises(ValueError, match=r"clusters has shape \[5\]; expected \[30\]"):
        DiversityAnalyzer().analyze(X, labels[:5])


def test_similarity_helpers():
    X = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    assert mean_cosine_similarity(X) == pytest.approx(1 / 3)
    assert pairwise_similarities(X).shape == (3,)
    big = np.random.default_rng(0).standard_normal((50, 4))
    assert pairwise_similarities(big, max_samples=10).shape == (45,)


def test_calculate_diversity_mean_pairwise_cosine_distance_and_vendi():
    X = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    result = DiversityAnalyzer().calculate_diversity(X)
    assert result["mean_pairwise_cosine_distance"] == pytest.approx(2 / 3)
    assert result["vendi_score_raw"] == pytest.approx(vendi_score(X))
    assert 1.0 <= result["vendi_score"] <= 2.0


def test_calculate_diversity_per_layer_ranks_a_varied_layer_above_a_uniform_one():
    rng = np.random.default_rng(0)
    varied = rng.standard_normal((30, 16))
    uniform = np.tile(rng.standard_normal(16), (30, 1)) + 0.01 * rng.standard_normal((30, 16))
    per_layer = DiversityAnalyzer().calculate_diversity(np.stack([uniform, varied], axis=1))
    assert [d["layer"] for d in per_layer] == [0, 1]
    assert per_layer[0]["mean_pairwise_cosine_distance"] < 0.01 < 0.5 < per_layer[1]["mean_pairwise_cosine_distance"]
    assert per_layer[0]["vendi_score_raw"] < 1.1 < 5 < per_layer[1]["vendi_score_raw"]


def _genre_collection(seed: int = 0):
    """rock and jazz: tight and close to each other; folk: loose and far; harp: 2 tracks; 3 unlabelled tracks."""
    rng = np.random.default_rng(seed)
    dim = 16
    rock = rng.standard_normal(dim) * 3
    centres = {"rock": rock, "jazz": rock + rng.standard_normal(dim), "folk": rng.standard_normal(dim) * 3,
               "harp": rng.standard_normal(dim) * 3}
    spread = {"rock": 0.1, "jazz": 0.1, "folk": 0.5, "harp": 0.1}
    counts = {"rock": 12, "jazz": 12, "folk": 12, "harp": 2}
    rows, genres = [], []
    for genre, count in counts.items():
        rows.append(centres[genre] + spread[genre] * rng.standard_normal((count, dim)))
        genres += [genre] * count
    rows.append(rng.standard_normal((3, dim)) * 3)
    genres += [None, "", None]
    return np.vstack(rows), genres


def test_musical_coverage_spread_centroid_distances_and_under_covered_labels():
    X, genres = _genre_collection()
    coverage = DiversityAnalyzer().analyze_musical_coverage(X, {"genre": genres})["genre"]
    assert coverage["n_labelled"] == 38 and coverage["n_unlabelled"] == 3
    labels = coverage["labels"]
    assert {g: labels[g]["n_tracks"] for g in labels} == {"folk": 12, "harp": 2, "jazz": 12, "rock": 12}
    assert labels["rock"]["share"] == pytest.approx(12 / 38)
    assert labels["folk"]["spread"] > 2 * max(labels["rock"]["spread"], labels["jazz"]["spread"])
    assert labels["rock"]["nearest_label"] == "jazz" and labels["jazz"]["nearest_label"] == "rock"
    distances = np.array(coverage["centroid_distances"]["matrix"])
    assert coverage["centroid_distances"]["labels"] == ["folk", "harp", "jazz", "rock"]
    assert np.allclose(distances, distances.T) and np.allclose(np.diag(distances), 0)
    assert labels["rock"]["nearest_label_distance"] == pytest.approx(distances[3, 2])
    assert coverage["under_covered"] == [{"label": "harp", "n_tracks": 2, "reason": "2 tracks: fewer than 3, too few "
                                                                              "to judge its spread and neighbours"}]
    assert coverage["knn_agreement"] >= 0.9 and coverage["silhouette"] > 0.3


def test_a_label_with_less_than_half_an_even_share_is_under_covered():
    X = np.random.default_rng(0).standard_normal((44, 8))
    genres = ["rock"] * 20 + ["jazz"] * 20 + ["harp"] * 4
    coverage = DiversityAnalyzer().analyze_musical_coverage(X, {"genre": genres})["genre"]
    assert coverage["under_covered"] == [{"label": "harp", "n_tracks": 4, "reason": "4 tracks: fewer than half an "
                                          "even share (14.7 tracks for each of 3 labels)"}]


def test_metadata_as_a_record_per_track_gives_the_same_coverage():
    X, genres = _genre_collection()
    records = [{"genre": g, "decade": "1970s"} if g else {"decade": "1980s"} for g in genres]
    analyzer = DiversityAnalyzer()
    by_records = analyzer.analyze_musical_coverage(X, records)
    assert list(by_records) == ["genre", "decade"]
    assert by_records["genre"] == analyzer.analyze_musical_coverage(X, {"genre": genres})["genre"]
    assert by_records["decade"]["labels"]["1980s"]["n_tracks"] == 3
    with pytest.raises(ValueError, match="metadata has 2 records for 41 tracks"):
        analyzer.analyze_musical_coverage(X, records[:2])


def test_musical_coverage_refuses_mismatched_metadata():
    X, _ = planted_blobs(n_per_blob=5, n_blobs=2, dim=8)
    with pytest.raises(ValueError, match="label column 'genre' has 4 values for 10 tracks"):
        DiversityAnalyzer().analyze_musical_coverage(X, {"genre": ["a", "b", "a", "b"]})
    with pytest.raises(ValueError, match="metadata has no label column"):
        DiversityAnalyzer().analyze_musical_coverage(X, {})


def test_a_single_label_has_undefined_separation_not_nan():
    X, _ = planted_blobs(n_per_blob=5, n_blobs=2, dim=8)
    coverage = DiversityAnalyzer().analyze_musical_coverage(X, {"genre": ["a"] * 10})["genre"]
    assert coverage["silhouette"] is None and coverage["knn_agreement"] is None
    assert coverage["labels"]["a"]["nearest_label"] is None and coverage["under_covered"] == []


def test_compare_embedding_methods_table_and_cka():
    X, blobs = planted_blobs(n_per_blob=15, n_blobs=3, dim=16, seed=1)
    rng = np.random.default_rng(2)
    rotation, _ = np.linalg.qr(rng.standard_normal((16, 16)))
    methods = {"signal": X, "rotated and scaled": 3.0 * X @ rotation, "noise": rng.standard_normal((45, 16)),
               "signal + shared offset": X + 50.0, "four axes": equal_axes(4, dim=16, n_rows=45)}
    result = DiversityAnalyzer().compare_embedding_methods(methods, {"blob": blobs})
    assert result["n_tracks"] == 45 and result["cka"]["methods"] == list(methods)
    rows = {r["method"]: r for r in result["methods"]}
    assert list(rows) == list(methods) and rows["signal"]["n_features"] == 16
    assert rows["signal"]["knn_label_agreement"] == {"blob": 1.0}
    assert rows["noise"]["knn_label_agreement"]["blob"] < 0.7
    assert rows["signal + shared offset"]["anisotropy"] > 0.95 > 0.5 > abs(rows["signal"]["anisotropy"])
    assert rows["four axes"]["effective_dimension"] == pytest.approx(4)
    cka = np.array(result["cka"]["matrix"], dtype=float)
    assert np.allclose(np.diag(cka), 1) and np.allclose(cka, cka.T)
    names = list(methods)
    assert cka[0, names.index("rotated and scaled")] == pytest.approx(1)
    assert cka[0, names.index("signal + shared offset")] == pytest.approx(1)
    assert cka[0, names.index("noise")] < 0.4
    unlabelled = DiversityAnalyzer().compare_embedding_methods({"signal": X})
    assert unlabelled["methods"][0]["knn_label_agreement"] == {} and unlabelled["cka"]["matrix"] == [[1.0]]


def test_compare_embedding_methods_refuses_different_track_sets():
    X, _ = planted_blobs(n_per_blob=5, n_blobs=2, dim=8)
    with pytest.raises(ValueError, match=r"cover different numbers of tracks \('a': 10, 'b': 7\)"):
        DiversityAnalyzer().compare_embedding_methods({"a": X, "b": X[:7]})
    with pytest.raises(ValueError, match="no methods to compare"):
        DiversityAnalyzer().compare_embedding_methods({})
    with pytest.raises(ValueError, match="label column 'genre' has 3 values for 10 tracks"):
        DiversityAnalyzer().compare_embedding_methods({"a": X}, {"genre": ["x", "y", "x"]})


def test_linear_cka_invariances_and_undefined_cases():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((200, 10))
    rotation, _ = np.linalg.qr(rng.standard_normal((10, 10)))
    assert linear_cka(X, 5.0 * X @ rotation + 3.0) == pytest.approx(1.0)
    assert linear_cka(X, rng.standard_normal((200, 10))) < 0.15
    assert linear_cka(X, np.ones((200, 4))) is None
    with pytest.raises(ValueError, match="X has 200 rows and Y 20"):
        linear_cka(X, X[:20])


def test_representations_of_the_layers_and_the_layer_mean():
    X, _ = planted_blobs(n_per_blob=10, n_blobs=3, dim=16)
    features = layered(X, n_states=3)
    methods = representations(features)
    assert list(methods) == ["layer 0, centred", "layer 1, centred", "layer 2, centred", "layer mean, raw",
                             "layer mean, centred", "layer mean, whitened"]
    for name in ("layer 0, centred", "layer mean, centred", "layer mean, whitened"):
        assert np.allclose(np.linalg.norm(methods[name], axis=1), 1.0)
    centre = methods["layer 1, centred"].mean(axis=0)
    assert centre @ centre < 0.05
    assert np.allclose(methods["layer mean, raw"], features.mean(axis=1), atol=1e-5)
    expected = components_for(explained_variance_ratio(features.mean(axis=1)), 0.9)
    assert methods["layer mean, whitened"].shape == (30, expected)
    with pytest.raises(ValueError, match=r"\[n_tracks, n_layers, hidden\]; got shape \[30, 16\]"):
        representations(X)
