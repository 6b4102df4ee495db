"""The analysis of one dataset's track embeddings as an ``AnalysisReport``.

``load_inputs`` reads what the analysis needs (features, labels, the MFCC + chroma baseline, whose cache it fills);
``analyze_dataset`` computes every section from them and writes nothing.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np

import mess_ai
from mess_ai.analysis.baseline import BaselineConfig, dataset_baseline
from mess_ai.analysis.embedding_analyzer import (
    EmbeddingAnalysis,
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
    representations,
)
from mess_ai.analysis.labels import Labels, folder_labels, read_labels_csv
from mess_ai.analysis.loading import DatasetFeatures, TrackInfo, load_dataset_features
from mess_ai.analysis.preprocessing import LAYER_MEAN, select_layer
from mess_ai.analysis.results import (
    MAX_LISTED,
    REPORT_FORMAT_VERSION,
    AnalysisReport,
    BaselineComparison,
    Clusters,
    Coverage,
    DbscanClustering,
    Dimension,
    Diversity,
    DuplicatePair,
    KMeansClustering,
    LabelMetrics,
    LabelResults,
    LayerMetrics,
    MethodComparison,
    NearDuplicates,
    NormStats,
    Outlier,
    Outliers,
    Quality,
    SkippedClustering,
    SkippedSource,
    TrackResult,
    WardClustering,
)
from mess_ai.store.layers import LAYER_ALL

# Per-layer metrics and the similarity histogram use a random sample of this many tracks in larger datasets.
MAX_SAMPLE_TRACKS = 2000
REPRESENTATION = ("mean over hidden states; clusters, outliers, duplicates and diversity in the cosine geometry of "
                  "the centred, L2-normalised vectors")


@dataclass(frozen=True, eq=False)
class BaselineFeatures:
    """MFCC + chroma statistics of the tracks whose source audio could be read."""

    config: BaselineConfig
    found: tuple[int, ...]  # indices into the dataset's tracks
    vectors: np.ndarray  # float32 [len(found), config.n_features]
    skipped: tuple[dict, ...]  # {"track_id", "relative_path", "reason"} per source that could not be used


@dataclass(frozen=True, eq=False)
class AnalysisInputs:
    """Everything ``analyze_dataset`` reads."""

    data: DatasetFeatures  # vectors float32 [n_tracks, n_hidden_states, hidden]
    labels: Labels
    label_source: str | None
    baseline: BaselineFeatures | None  # None: not requested
    notes: tuple[str, ...] = ()  # for the report, e.g. labels of recordings that are not extracted

    @property
    def layer_mean(self) -> np.ndarray:
        """The tracks' mean over hidden states: float [n_tracks, hidden]."""
        return select_layer(self.data.vectors, LAYER_MEAN)


def load_inputs(store_root: str | Path, dataset: str | None = None, labels_csv: str | Path | None = None,
                n_clusters: int | None = None, *, baseline: bool = True, manifest_url: str | None = None
                ) -> AnalysisInputs:
    """A dataset's features (every hidden state), its labels (``labels_csv``, else the tracks' top folders when
    there are at least two; rows of recordings that are not extracted are left out, with a note) and, with
    ``baseline``, MFCC + chroma statistics of the source audio (cached). ValueError for fewer than 3 tracks, a bad
    ``n_clusters`` or bad labels, before any audio is decoded."""
    data = load_dataset_features(store_root, dataset, layer=LAYER_ALL, manifest_url=manifest_url)
    n = len(data.tracks)
    if n < 3:
        raise ValueError(f"dataset {data.dataset!r} has {n} extracted track{'s' * (n != 1)}; "
                         "analysis needs at least 3")
    if n_clusters is not None:
        check_n_clusters(n_clusters, n)
    notes: list[str] = []
    if labels_csv is not None:
        labels, notes = read_labels_csv(labels_csv, data.tracks)
        label_source = str(labels_csv)
    else:
        labels = folder_labels(data.tracks) or {}
        label_source = "top folder of each file" if labels else None
    features = None
    if baseline:
        config = BaselineConfig()
        found, vectors, skipped = dataset_baseline(data.dataset_dir, data.tracks, config)
        features = BaselineFeatures(config, tuple(found), vectors, tuple(skipped))
    return AnalysisInputs(data, labels, label_source, features, tuple(notes))


def analyze_dataset(inputs: AnalysisInputs, n_clusters: int | None = None, random_state: int = 0) -> AnalysisReport:
    """Quality, outliers, near-duplicates, dimension, clusters (k-means; ``n_clusters``, else chosen by
    silhouette), diversity, label agreement and coverage of the layer mean; metrics per hidden state; the method
    comparison and the baseline. ValueError for fewer than 3 tracks, a bad ``n_clusters`` or identical tracks."""
    data, labels = inputs.data, inputs.labels
    tracks, features, X = data.tracks, data.vectors, inputs.layer_mean
    analyzer = EmbeddingAnalyzer(n_clusters=n_clusters, random_state=random_state)
    analysis = analyzer.analyze(X)
    diversity = DiversityAnalyzer(MAX_SAMPLE_TRACKS, random_state)
    sample, notes = _sample(len(tracks), random_state)
    kmeans_note = analysis.clustering["kmeans"].get("note")
    baseline, found, B = _baseline(inputs.baseline, labels, analysis.n_clusters, analysis.clusters, random_state)
    return AnalysisReport(
        format_version=REPORT_FORMAT_VERSION, mess_ai_version=mess_ai.__version__,
        created_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), store=str(data.store_root),
        dataset=data.dataset, n_tracks=len(tracks), model=data.provenance.get("model"),
        config_key=data.provenance.get("config_key"), n_hidden_states=int(features.shape[1]),
        hidden_size=int(features.shape[2]), fingerprint=data.fingerprint, random_state=random_state,
        representation=REPRESENTATION,
        quality=Quality.from_json(analysis.quality),
        clusters=_clusters(analysis.clustering, tracks),
        outliers=_outliers(analysis.quality, tracks, analyzer.outlier_threshold),
        near_duplicates=_near_duplicates(analysis.quality["near_duplicates"], tracks, analyzer.duplicate_similarity),
        dimension=Dimension.from_json(analysis.dimensions),
        diversity=Diversity.from_json(diversity.analyze(X, analysis.clusters)),
        labels=LabelResults(inputs.label_source, {column: _label_metrics(X, values, analysis.clusters)
                                                  for column, values in labels.items()}),
        coverage={column: Coverage.from_json(result)
                  for column, result in (diversity.analyze_musical_coverage(X, labels) if labels else {}).items()},
        per_layer=_per_layer(features[sample], analyzer, diversity, analysis.n_clusters,
                             {c: [v[i] for i in sample] for c, v in labels.items()}),
        method_comparison=_method_comparison(features, sample, found, B, labels, diversity),
        baseline=baseline,
        tracks=_tracks(tracks, analysis, labels),
        notes=(*inputs.notes, *([kmeans_note] if kmeans_note else []), *notes),
        map_variance=tuple(float(v) for v in analysis.map_variance),
    )


def _sample(n: int, random_state: int) -> tuple[np.ndarray, list[str]]:
    """The tracks the per-layer metrics and the method comparison use, and the note saying so when not all."""
    if n <= MAX_SAMPLE_TRACKS:
        return np.arange(n), []
    sample = np.sort(np.random.default_rng(random_state).choice(n, MAX_SAMPLE_TRACKS, replace=False))
    return sample, [f"per-layer metrics and the method comparison use a random sample of {MAX_SAMPLE_TRACKS} "
                    f"of the {n} tracks"]


def _clusters(clustering: dict, tracks: Sequence[TrackInfo]) -> Clusters:
    """``perform_clustering``'s result for the report: exemplars named, per-track labels left to the tracks."""
    def method(kind: type, result: dict):
        if "skipped" in result:
            return SkippedClustering(result["skipped"])
        return kind.from_json({**result, "exemplars": [
            {"cluster": c, "track_id": tracks[i].track_id, "relative_path": tracks[i].relative_path}
            for c, i in enumerate(result["exemplars"])]})

    return Clusters(method(KMeansClustering, clustering["kmeans"]),
                    method(WardClustering, clustering["agglomerative"]), method(DbscanClustering, clustering["dbscan"]))


def _outliers(quality: dict, tracks: Sequence[TrackInfo], threshold: float) -> Outliers:
    scores = quality["outlier_scores"]
    return Outliers(threshold, tuple(Outlier(tracks[i].track_id, tracks[i].relative_path, float(scores[i]))
                                     for i in quality["outliers"]))


def _near_duplicates(pairs: list[tuple[int, int, float]], tracks: Sequence[TrackInfo], min_similarity: float
                     ) -> NearDuplicates:
    listed = tuple(DuplicatePair(tracks[i].relative_path, tracks[j].relative_path, tracks[i].track_id,
                                 tracks[j].track_id, s) for i, j, s in pairs[:MAX_LISTED])
    return NearDuplicates(min_similarity, len(pairs), listed)


def _tracks(tracks: Sequence[TrackInfo], analysis: EmbeddingAnalysis, labels: Labels) -> tuple[TrackResult, ...]:
    def other(name: str, i: int) -> int | None:
        result = analysis.clustering[name]
        return int(result["labels"][i]) if "labels" in result else None

    scores = analysis.quality["outlier_scores"]
    return tuple(TrackResult(t.track_id, t.relative_path, int(analysis.clusters[i]), other("agglomerative", i),
                             other("dbscan", i), float(scores[i]), tuple(float(x) for x in analysis.map_2d[i]),
                             {c: v[i] for c, v in labels.items()})
                 for i, t in enumerate(tracks))


def _label_metrics(X: np.ndarray, values: list, clusters: np.ndarray) -> LabelMetrics:
    """How well the labels agree with the clusters and with nearest neighbours, on the labelled tracks of X."""
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    labelled = np.array([v is not None for v in values])
    kept = np.array([v for v in values if v is not None], dtype=object)
    classes, counts = np.unique(kept.astype(str), return_counts=True) if kept.size else ([], [])
    n_labelled = int(labelled.sum())
    metrics = LabelMetrics(n_labelled, {str(c): int(n) for c, n in zip(classes, counts)}, None, None, None,
                           float(max(counts) / n_labelled) if kept.size else None)
    if n_labelled < 3 or len(classes) < 2:
        return replace(metrics, note=f"{n_labelled} labelled tracks in {len(classes)} classes: at least 3 tracks "
                                     "in 2 classes are needed")
    names = kept.astype(str)
    return replace(metrics, adjusted_rand_index=float(adjusted_rand_score(names, clusters[labelled])),
                   normalized_mutual_info=float(normalized_mutual_info_score(names, clusters[labelled])),
                   # Neighbours in the geometry of the whole collection, as coverage and similarity search see it.
                   knn_accuracy=label_agreement(unit_vectors(X), values, center=False))


def _per_layer(features: np.ndarray, analyzer: EmbeddingAnalyzer, diversity: DiversityAnalyzer, n_clusters: int,
               labels: Labels) -> tuple[LayerMetrics, ...]:
    """Metrics of each hidden state of features [n, n_layers, hidden]."""
    dimensions = analyzer.analyze_dimensions(features)
    quality = analyzer.analyze_embedding_quality(features)
    spread = diversity.calculate_diversity(features)
    k = min(n_clusters, features.shape[0] - 1)
    rows = []
    for layer, (dims, health, varied) in enumerate(zip(dimensions, quality, spread)):
        X = features[:, layer]
        Z = unit_vectors(X)
        rows.append(LayerMetrics(
            layer=layer,
            silhouette=silhouette(X, cluster(X, k, analyzer.random_state), analyzer.random_state),
            # As in the method comparison's "layer i, centred" row: centred over all tracks, then the labelled.
            knn_accuracy={column: label_agreement(Z, values, center=False) for column, values in labels.items()},
            vendi_score=varied["vendi_score"],
            mean_pairwise_cosine_distance=varied["mean_pairwise_cosine_distance"],
            anisotropy=health["anisotropy"],
            norm=NormStats.from_json(health["norm"]),
            constant_dimensions=health["constant_dimensions"],
            n_outliers=len(health["outliers"]),
            n_near_duplicates=len(health["near_duplicates"]),
            intrinsic_dimension=dims["intrinsic_dimension"],
            pca_components_90=dims["pca_components_90"],
            pca_components_95=dims["pca_components_95"],
            participation_ratio=dims["participation_ratio"],
            explained_variance_ratio=tuple(float(v) for v in dims["explained_variance_ratio"]),
        ))
    return tuple(rows)


def _baseline(baseline: BaselineFeatures | None, labels: Labels, n_clusters: int, clusters: np.ndarray,
              random_state: int) -> tuple[BaselineComparison, tuple[int, ...], np.ndarray | None]:
    """The baseline section, the tracks that have baseline features and those features, standardised per
    feature: float [n_found, n_features] (None when the baseline is unavailable)."""
    from sklearn.metrics import adjusted_rand_score

    if baseline is None:
        return BaselineComparison("not requested"), (), None
    found = baseline.found
    section = BaselineComparison(
        None, f"mean and std over time of {baseline.config.n_mfcc} MFCCs and 12 chroma bins (librosa), standardised "
              "per feature", len(found), tuple(SkippedSource.from_json(s) for s in baseline.skipped[:MAX_LISTED]),
        len(baseline.skipped))
    if len(found) < 3:
        return replace(section, reason=f"{len(found)} source files could be read; at least 3 are needed"), found, None
    B = baseline.vectors
    std = B.std(axis=0)
    B = (B - B.mean(axis=0)) / np.where(std > 0, std, 1.0)
    if np.all(B == B[0]):
        return replace(section, reason="every readable track has the same baseline features"), found, None
    k = min(n_clusters, len(found) - 1)
    baseline_clusters = cluster(B, k, random_state)
    section = replace(
        section, n_clusters=k, silhouette=silhouette(B, baseline_clusters, random_state),
        agreement_with_embedding_clusters_ari=float(adjusted_rand_score(clusters[list(found)], baseline_clusters)),
        labels={column: _label_metrics(B, [values[i] for i in found], baseline_clusters)
                for column, values in labels.items()})
    return section, found, B


def _method_comparison(features: np.ndarray, sample: np.ndarray, found: Sequence[int], B: np.ndarray | None,
                       labels: Labels, diversity: DiversityAnalyzer) -> MethodComparison:
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
    return MethodComparison.from_json({**comparison, "note": note})
