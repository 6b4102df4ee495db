"""``run_analysis``: the report and its plots, planted structure in every section (per layer too), the report file
read back into the same results, the computation writing nothing, and bad input refused with numbers."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from mess_ai.analysis.dataset_analysis import analyze_dataset, load_inputs
from mess_ai.analysis.embedding_diversity import BASELINE_METHOD
from mess_ai.analysis.report import run_analysis
from mess_ai.analysis.results import AnalysisReport, DbscanClustering, WardClustering, json_ready
from mess_ai.store.atomic import atomic_save_npy
from tests.helpers.embeddings import layered, planted_blobs, write_store

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PLOTS = {"map", "explained_variance", "layer_metrics", "similarity_histogram", "method_comparison"}
LAYER_KEYS = {"layer", "silhouette", "knn_accuracy", "vendi_score", "mean_pairwise_cosine_distance", "anisotropy",
              "norm", "constant_dimensions", "n_outliers", "n_near_duplicates", "intrinsic_dimension",
              "pca_components_90", "pca_components_95", "participation_ratio", "explained_variance_ratio"}
# The report file's sections, in order: readers of report.json and of the flow's result rely on them.
REPORT_KEYS = ["format", "mess_ai_version", "created_at", "store", "dataset", "n_tracks", "model", "config_key",
               "n_hidden_states", "hidden_size", "fingerprint", "random_state", "representation", "quality", "clusters",
               "outliers", "near_duplicates", "dimension", "diversity", "labels", "coverage", "per_layer",
               "method_comparison", "baseline", "tracks", "notes", "files"]


def strict_json(text):
    """Parse JSON, refusing NaN and infinity (which Python's json would otherwise accept)."""
    def refuse(constant):
        raise ValueError(f"JSON holds {constant}")

    return json.loads(text, parse_constant=refuse)


def check_written(report):
    """The report file is ``report.to_json()``, holds the report's sections in order, and reads back into the
    same report; every plot is a PNG. Returns the file's JSON."""
    files = report.files
    on_disk = strict_json(files.report.read_text(encoding="utf-8"))
    assert on_disk == report.to_json() and list(on_disk) == REPORT_KEYS
    assert AnalysisReport.from_json(on_disk).to_json() == on_disk
    assert set(files.plots) == PLOTS | ({"coverage"} if report.coverage else set())
    for path in files.plots.values():
        assert path.read_bytes()[:8] == PNG_MAGIC
    return on_disk


def planted_store(root, n_per_blob=8, n_blobs=3, outlier=True, duplicate=True):
    X, labels = planted_blobs(n_per_blob, n_blobs, dim=24, seed=11)
    names = [f"g{label}/t{i:02d}.wav" for i, label in enumerate(labels)]
    if outlier:
        X = np.vstack([X, np.random.default_rng(5).standard_normal(24) * 10])
        names.append("odd/outlier.wav")
    if duplicate:
        X = np.vstack([X, X[0] + 1e-3])
        names.append("g0/copy_of_t00.wav")
    ids = [n.replace("/", "_").removesuffix(".wav") for n in names]
    write_store(root, "planted", dict(zip(ids, layered(X))), relative_paths=dict(zip(ids, names)))
    return ids, names


def test_planted_structure_reaches_the_report(tmp_path):
    ids, names = planted_store(tmp_path / "store")
    report = run_analysis(tmp_path / "store", "planted", baseline=False)
    on_disk = check_written(report)
    clusters = report.clusters
    kmeans = clusters.kmeans
    assert kmeans.n_clusters >= 3 and kmeans.calinski_harabasz > 0 and kmeans.davies_bouldin > 0
    assert isinstance(clusters.agglomerative, WardClustering) and isinstance(clusters.dbscan, DbscanClustering)
    for method in (kmeans, clusters.agglomerative, clusters.dbscan):
        assert [e.cluster for e in method.exemplars] == list(range(method.n_clusters))
        assert all(e.relative_path in names for e in method.exemplars)
    assert "odd/outlier.wav" in [t.relative_path for t in report.tracks if t.cluster_dbscan == -1]
    folder = report.labels.columns["folder"]
    assert report.labels.source == "top folder of each file" and folder.knn_accuracy >= 0.9
    coverage = report.coverage["folder"]
    assert coverage.knn_agreement == folder.knn_accuracy
    assert [u.label for u in coverage.under_covered] == ["odd"]
    assert report.outliers.tracks[0].relative_path == "odd/outlier.wav"
    pairs = report.near_duplicates.pairs
    assert {pairs[0].a, pairs[0].b} == {"g0/t00.wav", "g0/copy_of_t00.wav"}
    assert report.quality.constant_dimensions == 0 and -1 <= report.quality.anisotropy <= 1
    assert report.dimension.pca_components_90 <= report.dimension.pca_components_95
    assert len(report.per_layer) == 3 and report.per_layer[0].layer == 0
    assert all(set(layer) == LAYER_KEYS for layer in on_disk["per_layer"])
    comparison = report.method_comparison
    assert [r.method for r in comparison.methods] == ["layer 0, centred", "layer 1, centred", "layer 2, centred",
                                                      "layer mean, raw", "layer mean, centred", "layer mean, whitened"]
    assert on_disk["baseline"] == {"available": False, "reason": "not requested"} and not report.baseline.available
    assert [t["relative_path"] for t in on_disk["tracks"]] == sorted(names)
    assert len(report.map_variance) == 2 and report.map_variance[0] >= report.map_variance[1]


def test_each_of_13_hidden_states_is_measured_and_compared(tmp_path):
    """Labels emerge over depth: hidden state 0 is noise, state 12 holds the planted blobs."""
    X, blobs = planted_blobs(n_per_blob=8, n_blobs=3, dim=16, seed=3)
    noise = np.random.default_rng(4).standard_normal(X.shape) * 4
    depth = np.linspace(0, 1, 13)[None, :, None]
    features = (depth * X[:, None] + (1 - depth) * noise[:, None]).astype(np.float32)
    names = [f"g{b}/t{i:02d}.wav" for i, b in enumerate(blobs)]
    ids = [f"t{i:02d}" for i in range(len(names))]
    write_store(tmp_path / "store", "deep", dict(zip(ids, features)), relative_paths=dict(zip(ids, names)))
    report = run_analysis(tmp_path / "store", "deep", n_clusters=3, baseline=False)
    check_written(report)
    per_layer = report.per_layer
    assert [m.layer for m in per_layer] == list(range(13)) and report.n_hidden_states == 13
    assert per_layer[12].knn_accuracy["folder"] == 1.0 > per_layer[0].knn_accuracy["folder"]
    assert per_layer[12].silhouette > per_layer[0].silhouette
    for m in per_layer:
        assert 1 <= m.pca_components_90 <= m.pca_components_95 <= 16 and 1 <= m.participation_ratio <= 16
    rows = {r.method: r for r in report.method_comparison.methods}
    assert len(rows) == 13 + 3 and len(report.method_comparison.cka) == 16
    # The table and the per-layer section measure a layer in the same geometry, so they agree.
    assert all(rows[f"layer {m.layer}, centred"].knn_label_agreement == m.knn_accuracy for m in per_layer)
    assert rows["layer 12, centred"].knn_label_agreement["folder"] == 1.0


def test_fixed_k_matches_the_planted_blobs(tmp_path):
    from sklearn.metrics import adjusted_rand_score

    planted_store(tmp_path / "store", outlier=False, duplicate=False)
    report = run_analysis(tmp_path / "store", None, n_clusters=3, baseline=False)
    folders = [t.labels["folder"] for t in report.tracks]
    assert adjusted_rand_score(folders, [t.cluster for t in report.tracks]) >= 0.9
    assert report.clusters.kmeans.chosen_by == "given" and report.clusters.kmeans.sizes == (8, 8, 8)


def test_tones_and_noise_separated_by_baseline_with_labels_csv(tone_store, tmp_path):
    store, dataset, classes = tone_store
    labels = tmp_path / "labels.csv"
    # File names, relative paths: both name tracks.
    rows = [f"{rel.split('/')[-1] if i % 2 else rel},{cls}" for i, (rel, cls) in enumerate(classes.items())]
    labels.write_text("file,pitch_class\n" + "\n".join(rows) + "\n")
    report = run_analysis(store, dataset, labels_csv=labels, n_clusters=4)
    on_disk = check_written(report)
    assert report.labels.source == str(labels)
    baseline = report.baseline
    assert baseline.available and baseline.n_tracks == 12 and baseline.n_clusters == 4
    assert baseline.labels["pitch_class"].adjusted_rand_index >= 0.9
    assert baseline.labels["pitch_class"].knn_accuracy == 1.0
    embedding = report.labels.columns["pitch_class"]
    assert embedding.n_labelled == 12 and embedding.classes == {"A": 3, "C": 3, "E": 3, "noise": 3}
    assert report.coverage["pitch_class"].under_covered == ()
    comparison = report.method_comparison
    methods = [r.method for r in comparison.methods]
    assert methods[-1] == BASELINE_METHOD and len(methods) == 3 + 3 + 1 and comparison.n_tracks == 12
    assert comparison.methods[-1].knn_label_agreement == {"pitch_class": 1.0}
    assert on_disk["method_comparison"]["cka"]["methods"] == methods and comparison.cka[-1][-1] == pytest.approx(1)


def test_too_few_tracks_and_bad_k_name_the_numbers(tmp_path):
    X, _ = planted_blobs(2, 2, dim=8)
    write_store(tmp_path / "s1", "four", {f"t{i}": a for i, a in enumerate(layered(X))})
    with pytest.raises(ValueError, match=r"number of clusters is 5 for 4 tracks; valid values are 2 to "
                                         r"n_tracks - 1 = 3"):
        run_analysis(tmp_path / "s1", "four", n_clusters=5, baseline=False)
    write_store(tmp_path / "s2", "one", {"only": layered(X[:1])[0]})
    with pytest.raises(ValueError, match="dataset 'one' has 1 extracted track; analysis needs at least 3"):
        run_analysis(tmp_path / "s2", "one")
    assert not (tmp_path / "s2" / "one" / "reports").exists()


def test_nan_and_mixed_dimensions_in_the_store_are_refused(tmp_path):
    X, _ = planted_blobs(3, 2, dim=8)
    write_store(tmp_path / "s", "d", {f"t{i}": a for i, a in enumerate(layered(X))})
    bad = layered(X[:1])[0]
    bad[0, 0] = np.nan
    atomic_save_npy(tmp_path / "s" / "d" / "aggregated" / "t2.npy", bad)
    with pytest.raises(ValueError, match=r"track t2 \(t2.wav\) has 1 non-finite values"):
        run_analysis(tmp_path / "s", "d")
    atomic_save_npy(tmp_path / "s" / "d" / "aggregated" / "t2.npy", np.zeros((3, 5), dtype=np.float32))
    with pytest.raises(ValueError, match=r"5 with shape \[3, 8\] \(e.g. t0.wav\), 1 with shape \[3, 5\] "
                                         r"\(e.g. t2.wav\)"):
        run_analysis(tmp_path / "s", "d")


def test_labels_of_recordings_not_extracted_are_left_out_with_a_note(tmp_path, caplog):
    """Labels of a whole corpus, a few of its files extracted so far: the analysis runs on what is covered, and
    the report says what was left out."""
    planted_store(tmp_path / "store")
    labels = tmp_path / "labels.csv"
    labels.write_text("file,genre\ng0/t00.wav,a\ng1/t08.wav,b\nnot_there.wav,b\n")
    report = run_analysis(tmp_path / "store", "planted", labels_csv=labels, baseline=False)
    note = (f"{labels}: 1 of 3 rows name recordings that are not extracted ('not_there.wav' (line 4)); the analysis "
            "uses the labels of the 2 that are extracted")
    assert report.notes[0] == note and check_written(report)["notes"][0] == note
    assert report.labels.columns["genre"].n_labelled == 2 and report.n_tracks == 26
    assert note in [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    labels.write_text("file,genre\nnot_there.wav,b\n")
    with pytest.raises(ValueError, match=r"none of its 1 rows names an extracted track .*'not_there.wav' \(line 2\)"):
        run_analysis(tmp_path / "store", "planted", labels_csv=labels, baseline=False)


def test_undefined_metrics_are_null_never_nan(tmp_path):
    # Three tracks, two identical: silhouettes and label metrics are undefined, the JSON stays valid.
    a, b = np.random.default_rng(0).standard_normal((2, 3, 6)).astype(np.float32)
    write_store(tmp_path / "s", "d", {"x": a, "y": a, "z": b}, relative_paths={"x": "p/x.wav", "y": "p/y.wav",
                                                                              "z": "q/z.wav"})
    report = run_analysis(tmp_path / "s", "d", baseline=True)
    on_disk = check_written(report)
    assert report.baseline.available is False and report.baseline.n_skipped == 3
    assert report.dimension.intrinsic_dimension is None
    assert report.near_duplicates.count == 1
    dbscan = report.clusters.dbscan  # one cluster and a noise track: no separation to score
    assert dbscan.n_clusters == 1 and dbscan.silhouette is dbscan.davies_bouldin is None
    assert report.coverage["folder"].labels["q"].spread is None  # a label of one track
    assert on_disk["coverage"]["folder"]["labels"]["q"]["spread"] is None


def test_json_ready_refuses_non_finite_numbers():
    assert json_ready({"a": np.float32(1.5), "b": [np.int64(2)], "c": None}) == {"a": 1.5, "b": [2], "c": None}
    with pytest.raises(ValueError, match=r"report.per_layer\[1\].silhouette is nan"):
        json_ready({"per_layer": [{"silhouette": 0.1}, {"silhouette": float("nan")}]})
    with pytest.raises(ValueError, match="is inf"):
        json_ready(np.array([1.0, np.inf]))


def test_computing_writes_nothing_and_a_nan_in_a_result_is_refused_by_name(tmp_path):
    planted_store(tmp_path / "store")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    inputs = load_inputs(tmp_path / "store", "planted", baseline=False)
    report = analyze_dataset(inputs, n_clusters=3)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    assert report.files is None and "files" not in report.to_json() and report.n_tracks == len(inputs.data.tracks)
    broken = dataclasses.replace(report, per_layer=(
        report.per_layer[0], dataclasses.replace(report.per_layer[1], silhouette=float("nan"))))
    with pytest.raises(ValueError, match=r"AnalysisReport.per_layer\[1\].silhouette is nan"):
        broken.to_json()
