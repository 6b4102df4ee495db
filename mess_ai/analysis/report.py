"""The analysis report of a dataset: ``<store>/<dataset>/reports/report.json`` and its PNG plots.

``run_analysis`` is the one entry point the CLI (``mess-ai analyze``) and the Prefect flow both call.
The JSON never holds NaN or infinity: an undefined metric is ``null``, and a non-finite number raises.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

import mess_ai
from mess_ai.analysis.baseline import BaselineConfig, dataset_baseline
from mess_ai.analysis.embedding_analyzer import (
    EmbeddingAnalyzer,
    check_n_clusters,
    cluster,
    silhouette,
    unit_vectors,
)
from mess_ai.analysis.embedding_diversity import (
    BASELINE_METHOD,
    DiversityAnalyzer,
    label_agreement,
    pairwise_similarities,
    representations,
)
from mess_ai.analysis.labels import Labels, folder_labels, read_labels_csv
from mess_ai.analysis.loading import LAYER_ALL, TrackInfo, load_dataset_features
from mess_ai.analysis.plots import (
    plot_coverage,
    plot_explained_variance,
    plot_layer_metrics,
    plot_map,
    plot_method_comparison,
    plot_similarity_histogram,
)
from mess_ai.analysis.preprocessing import LAYER_MEAN, select_layer
from mess_ai.store.atomic import atomic_write_bytes

REPORT_DIR = "reports"
REPORT_FORMAT_VERSION = 1
# Per-layer metrics and the similarity histogram use a random sample of this many tracks in larger datasets.
MAX_SAMPLE_TRACKS = 2000
# Lists in the report (near-duplicate pairs, skipped files) stop at this many entries; counts are complete.
MAX_LISTED = 100
MAX_LISTED_COMPONENTS = 50


def json_ready(value: Any, where: str = "report") -> Any:
    """``value`` with numpy scalars and arrays turned into plain Python; ValueError on NaN or infinity."""
    if isinstance(value, dict):
        return {str(k): json_ready(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [json_ready(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        if not math.isfinite(value):
            raise ValueError(f"{where} is {value}: a report never holds non-finite numbers")
        return float(value)
    if isinstance(value, Path):
        return str(value)
    if value is None or isinstance(value, str):
        return value
    raise TypeError(f"{where} has type {type(value).__name__}, which a report cannot hold")


def _label_metrics(X: np.ndarray, values: list, clusters: np.ndarray) -> dict:
    """How well the labels agree with the clusters and with nearest neighbours, on the labelled tracks of X."""
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    labelled = np.array([v is not None for v in values])
    kept = np.array([v for v in values if v is not None], dtype=object)
    classes, counts = np.unique(kept.astype(str), return_counts=True) if kept.size else ([], [])
    result = {"n_labelled": int(labelled.sum()), "classes": {str(c): int(n) for c, n in zip(classes, counts)},
              "adjusted_rand_index": None, "normalized_mutual_info": None, "knn_accuracy": None,
              "majority_class_accuracy": float(max(counts) / labelled.sum()) if kept.size else None}
    if labelled.sum() < 3 or len(classes) < 2:
        result["note"] = (f"{int(labelled.sum())} labelled tracks in {len(classes)} classes: at least 3 tracks "
                          "in 2 classes are needed")
        return result
    names = kept.astype(str)
    result["adjusted_rand_index"] = float(adjusted_rand_score(names, clusters[labelled]))
    result["normalized_mutual_info"] = float(normalized_mutual_info_score(names, clusters[labelled]))
    # Neighbours in the geometry of the whole collection, as the coverage section and similarity search see it.
    result["knn_accuracy"] = label_agreement(unit_vectors(X), values, center=False)
    return result


def _per_layer(features: np.ndarray, analyzer: EmbeddingAnalyzer, diversity: DiversityAnalyzer, n_clusters: int,
               labels: Labels) -> tuple[list[dict], list[np.ndarray]]:
    """Metrics of each layer of features [n, n_layers, hidden], and each layer's explained variance ratios."""
    dimensions = analyzer.analyze_dimensions(features)
    quality = analyzer.analyze_embedding_quality(features)
    spread = diversity.calculate_diversity(features)
    k = min(n_clusters, features.shape[0] - 1)
    rows = []
    for layer, (dims, health, varied) in enumerate(zip(dimensions, quality, spread)):
        X = features[:, layer]
        Z = unit_vectors(X)
        rows.append({
            "layer": layer,
            "silhouette": silhouette(X, cluster(X, k, analyzer.random_state), analyzer.random_state),
            # As in the method comparison's "layer i, centred" row: centred over all tracks, then the labelled.
            "knn_accuracy": {column: label_agreement(Z, values, center=False) for column, values in labels.items()},
            "vendi_score": varied["vendi_score"],
            "mean_pairwise_cosine_distance": varied["mean_pairwise_cosine_distance"],
            "anisotropy": health["anisotropy"],
            "norm": health["norm"],
            "constant_dimensions": health["constant_dimensions"],
            "n_outliers": len(health["outliers"]),
            "n_near_duplicates": len(health["near_duplicates"]),
            "intrinsic_dimension": dims["intrinsic_dimension"],
            "pca_components_90": dims["pca_components_90"],
            "pca_components_95": dims["pca_components_95"],
            "participation_ratio": dims["participation_ratio"],
            "explained_variance_ratio": dims["explained_variance_ratio"][:MAX_LISTED_COMPONENTS],
        })
    return rows, [dims["explained_variance_ratio"] for dims in dimensions]


def _baseline(dataset_dir: Path, tracks: Sequence[TrackInfo], labels: Labels, n_clusters: int,
              clusters: np.ndarray, random_state: int) -> tuple[dict, list[int], np.ndarray | None]:
    """The baseline section, the tracks that have baseline features and those features, standardised per
    feature: float [n_found, n_features] (None when the baseline is unavailable)."""
    from sklearn.metrics import adjusted_rand_score

    config = BaselineConfig()
    found, B, skipped = dataset_baseline(dataset_dir, tracks, config)
    section: dict[str, Any] = {"features": f"mean and std over time of {config.n_mfcc} MFCCs and 12 chroma bins "
                                           "(librosa), standardised per feature",
                               "n_tracks": len(found), "skipped": skipped[:MAX_LISTED],
                               "n_skipped": len(skipped)}
    if len(found) < 3:
        section["available"] = False
        section["reason"] = f"{len(found)} source files could be read; at least 3 are needed"
        return section, found, None
    std = B.std(axis=0)
    B = (B - B.mean(axis=0)) / np.where(std > 0, std, 1.0)
    if np.all(B == B[0]):
        section["available"] = False
        section["reason"] = "every readable track has the same baseline features"
        return section, found, None
    k = min(n_clusters, len(found) - 1)
    baseline_clusters = cluster(B, k, random_state)
    section.update({
        "available": True,
        "n_clusters": k,
        "silhouette": silhouette(B, baseline_clusters, random_state),
        "agreement_with_embedding_clusters_ari": float(adjusted_rand_score(clusters[found], baseline_clusters)),
        "labels": {column: _label_metrics(B, [values[i] for i in found], baseline_clusters)
                   for column, values in labels.items()},
    })
    return section, found, B


def _method_comparison(features: np.ndarray, sample: np.ndarray, found: list[int], B: np.ndarray | None,
                       labels: Labels, diversity: DiversityAnalyzer) -> dict:
    """``compare_embedding_methods`` over the layers, the layer mean and its variants, and the baseline when
    it covers at least 3 of the sampled tracks (then on those tracks only)."""
    rows, note = sample, None
    if B is not None:
        position = {track: i for i, track in enumerate(found)}
        covered = np.array([i for i in sample if i in position], dtype=np.int64)
        if len(covered) >= 3:
            if len(covered) < len(sample):
                note = (f"compared on the {len(covered)} of {len(sample)} tracks whose source audio gave "
                        "baseline features")
            rows = covered
        else:
            note = f"the baseline covers {len(covered)} of the {len(sample)} tracks: left out of the comparison"
            B = None
    methods = representations(features[rows])
    if B is not None:
        methods[BASELINE_METHOD] = B[[position[i] for i in rows]]
    comparison = diversity.compare_embedding_methods(methods, {c: [v[i] for i in rows] for c, v in labels.items()})
    comparison["geometry"] = ("cosine of each method's vectors as given; 'layer i, centred' is layer i centred and "
                              "L2-normalised, as similarity search uses it")
    if note:
        comparison["note"] = note
    return comparison


def _clustering_section(result: dict, tracks: Sequence[TrackInfo]) -> dict:
    """A method's clustering for the report: exemplars named, per-track labels left to the tracks list."""
    section = {key: value for key, value in result.items() if key != "labels"}
    if "exemplars" in section:
        section["exemplars"] = [{"cluster": c, "track_id": tracks[i].track_id, "relative_path": tracks[i].relative_path}
                                for c, i in enumerate(result["exemplars"])]
    return section


def run_analysis(store_root: str | Path, dataset: str | None = None, labels_csv: str | Path | None = None,
                 n_clusters: int | None = None, random_state: int = 0, *, baseline: bool = True,
                 manifest_url: str | None = None) -> dict:
    """Analyse a dataset's track embeddings (the mean over hidden states, plus every hidden state on its own)
    and write ``<store>/<dataset>/reports/report.json`` with its plots. Returns the report; its ``files`` entry
    lists the paths written.

    Sections: ``quality``, ``outliers``, ``near_duplicates``, ``dimension``, ``clusters`` (k-means, with
    ``agglomerative`` and ``dbscan`` inside), ``diversity``, ``labels`` and ``coverage`` (per label column),
    ``per_layer`` (one entry per hidden state), ``method_comparison`` (layers, layer mean and its centred and
    whitened variants, the baseline), ``baseline``, ``tracks``, ``notes``.

    ``labels_csv``: a CSV with a ``file`` column and label columns (without it, the tracks' top folders are the
    labels when there are at least two). ``n_clusters``: fixed k, else chosen by silhouette. ``baseline``: also
    compute MFCC + chroma statistics from the source audio (cached) and report how they compare.
    ``manifest_url``: the store's manifest when it is not the default SQLite file.
    ValueError for fewer than 3 tracks, a bad ``n_clusters``, bad labels or non-finite / mixed-size features.
    """
    data = load_dataset_features(store_root, dataset, layer=LAYER_ALL, manifest_url=manifest_url)
    tracks, features = data.tracks, data.vectors
    n = len(tracks)
    if n < 3:
        raise ValueError(f"dataset {data.dataset!r} has {n} extracted track{'s' * (n != 1)}; "
                         "analysis needs at least 3")
    if n_clusters is not None:
        check_n_clusters(n_clusters, n)
    if labels_csv is not None:
        labels, label_source = read_labels_csv(labels_csv, tracks), str(labels_csv)
    else:
        labels = folder_labels(tracks) or {}
        label_source = "top folder of each file" if labels else None

    X = select_layer(features, LAYER_MEAN)
    analyzer = EmbeddingAnalyzer(n_clusters=n_clusters, random_state=random_state)
    analysis = analyzer.analyze(X)
    kmeans = analysis.clustering["kmeans"]
    diversity_analyzer = DiversityAnalyzer(MAX_SAMPLE_TRACKS, random_state)
    diversity = diversity_analyzer.analyze(X, analysis.clusters)
    coverage = diversity_analyzer.analyze_musical_coverage(X, labels) if labels else {}
    label_metrics = {column: _label_metrics(X, values, analysis.clusters) for column, values in labels.items()}

    sample = np.arange(n)
    notes = [kmeans["note"]] if "note" in kmeans else []
    if n > MAX_SAMPLE_TRACKS:
        sample = np.sort(np.random.default_rng(random_state).choice(n, MAX_SAMPLE_TRACKS, replace=False))
        notes.append(f"per-layer metrics and the method comparison use a random sample of {MAX_SAMPLE_TRACKS} "
                     f"of the {n} tracks")
    sampled_labels = {c: [v[i] for i in sample] for c, v in labels.items()}
    per_layer, layer_ratios = _per_layer(features[sample], analyzer, diversity_analyzer, analysis.n_clusters,
                                         sampled_labels)

    if baseline:
        baseline_section, found, B = _baseline(data.dataset_dir, tracks, labels, analysis.n_clusters,
                                               analysis.clusters, random_state)
    else:
        baseline_section, found, B = {"available": False, "reason": "not requested"}, [], None
    comparison = _method_comparison(features, sample, found, B, labels, diversity_analyzer)

    names = [t.relative_path for t in tracks]
    quality, dimensions = analysis.quality, analysis.dimensions
    duplicates = quality["near_duplicates"]
    other_methods = {name: analysis.clustering[name] for name in ("agglomerative", "dbscan")}
    report: dict[str, Any] = {
        "format": REPORT_FORMAT_VERSION,
        "mess_ai_version": mess_ai.__version__,
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "store": str(data.store_root),
        "dataset": data.dataset,
        "n_tracks": n,
        "model": data.provenance.get("model"),
        "config_key": data.provenance.get("config_key"),
        "n_hidden_states": int(features.shape[1]),
        "hidden_size": int(features.shape[2]),
        "fingerprint": data.fingerprint,
        "random_state": random_state,
        "representation": "mean over hidden states; clusters, outliers, duplicates and diversity in the cosine "
                          "geometry of the centred, L2-normalised vectors",
        "quality": {key: quality[key] for key in ("norm", "constant_dimensions", "anisotropy")},
        "clusters": {**_clustering_section(kmeans, tracks),
                     **{name: _clustering_section(result, tracks) for name, result in other_methods.items()}},
        "outliers": {
            "threshold": analyzer.outlier_threshold,
            "score": "local outlier factor among the nearest neighbours (about 1 for tracks inside a group)",
            "tracks": [{"track_id": tracks[i].track_id, "relative_path": names[i],
                        "score": quality["outlier_scores"][i]} for i in quality["outliers"]],
        },
        "near_duplicates": {
            "min_similarity": analyzer.duplicate_similarity,
            "count": len(duplicates),
            "pairs": [{"a": names[i], "b": names[j], "a_track_id": tracks[i].track_id,
                       "b_track_id": tracks[j].track_id, "similarity": s}
                      for i, j, s in duplicates[:MAX_LISTED]],
        },
        "dimension": {**dimensions,
                      "explained_variance_ratio": dimensions["explained_variance_ratio"][:MAX_LISTED_COMPONENTS]},
        "diversity": diversity,
        "labels": {"source": label_source, "columns": label_metrics},
        "coverage": coverage,
        "per_layer": per_layer,
        "method_comparison": comparison,
        "baseline": baseline_section,
        "tracks": [{"track_id": t.track_id, "relative_path": t.relative_path, "cluster": analysis.clusters[i],
                    **{f"cluster_{name}": result["labels"][i] for name, result in other_methods.items()
                       if "labels" in result},
                    "outlier_score": quality["outlier_scores"][i], "map": analysis.map_2d[i],
                    "labels": {c: v[i] for c, v in labels.items()}}
                   for i, t in enumerate(tracks)],
        "notes": notes,
    }
    # Checked before anything is written, so a non-finite number never leaves plots without a report.
    report = json_ready(report)
    report_dir = data.dataset_dir / REPORT_DIR
    title = f"{data.dataset}: {n} tracks"
    groups = {"k-means cluster": [f"cluster {c}" for c in analysis.clusters]}
    exemplars = {"k-means cluster": kmeans["exemplars"]}
    for name, result in other_methods.items():
        if "labels" in result:
            group = f"{name if name == 'agglomerative' else 'DBSCAN'} cluster"
            groups[group] = ["noise" if c < 0 else f"cluster {c}" for c in result["labels"]]
            exemplars[group] = result["exemplars"]
    groups.update({f"label '{c}'": v for c, v in list(labels.items())[:3]})
    baseline_accuracy = {c: m["knn_accuracy"] for c, m in baseline_section.get("labels", {}).items()}
    plots = {
        "map": plot_map(report_dir / "map.png", analysis.map_2d, groups, names, analysis.map_variance,
                        quality["outliers"], f"{title}, PCA map of the track embeddings", exemplars),
        "explained_variance": plot_explained_variance(report_dir / "explained_variance.png", layer_ratios,
                                                      dimensions["explained_variance_ratio"],
                                                      f"{title}, PCA of each hidden state"),
        "layer_metrics": plot_layer_metrics(report_dir / "layer_metrics.png", per_layer, list(labels),
                                            baseline_accuracy, f"{title}, metrics per hidden state"),
        "similarity_histogram": plot_similarity_histogram(
            report_dir / "similarity_histogram.png",
            pairwise_similarities(X, MAX_SAMPLE_TRACKS, random_state), analyzer.duplicate_similarity,
            f"{title}, pairwise similarities"),
        "method_comparison": plot_method_comparison(report_dir / "method_comparison.png", report["method_comparison"],
                                                    f"{title}, embedding methods compared"),
    }
    if coverage:
        plots["coverage"] = plot_coverage(report_dir / "coverage.png", report["coverage"],
                                          f"{title}, coverage of the labels")
    report_path = report_dir / "report.json"
    report["files"] = json_ready({"report": report_path, "plots": plots})
    text = json.dumps(report, indent=2, allow_nan=False) + "\n"
    atomic_write_bytes(report_path, text.encode("utf-8"))
    return report
