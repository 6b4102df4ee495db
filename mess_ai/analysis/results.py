"""The analysis of a dataset as frozen, typed results: what ``analyze_dataset`` returns and ``report.json`` holds.

Every result has the one ``to_json()`` below: its part of the report as plain JSON types, in the key order of the
file. ``from_json`` reads that part back; it also reads the dicts of the same shape that the analyzers return. An
undefined metric is None (``null``), never NaN: ``to_json`` raises ValueError on a non-finite number.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

import numpy as np

REPORT_FORMAT_VERSION = 1
# Lists in the report (near-duplicate pairs, skipped files) stop at this many entries; counts are complete.
MAX_LISTED = 100
MAX_LISTED_COMPONENTS = 50
OUTLIER_SCORE = "local outlier factor among the nearest neighbours (about 1 for tracks inside a group)"
METHOD_GEOMETRY = ("cosine of each method's vectors as given; 'layer i, centred' is layer i centred and "
                   "L2-normalised, as similarity search uses it")


def json_ready(value: Any, where: str = "report") -> Any:
    """``value`` with results, numpy scalars and arrays turned into plain Python; ValueError on NaN or infinity."""
    if isinstance(value, ReportPart):
        return json_ready(value.json_layout(), where)
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


def _floats(values) -> tuple[float, ...]:
    return tuple(float(v) for v in values)


def _matrix(rows) -> tuple[tuple[float | None, ...], ...]:
    return tuple(tuple(row) for row in rows)


def _optional(name: str, value: Any) -> dict:
    """``{name: value}``, or nothing when value is None: keys the report holds only when they apply."""
    return {} if value is None else {name: value}


class ReportPart:
    """A frozen result that is one part of the report. Its JSON is its fields in order unless ``json_layout``
    says otherwise; ``from_json`` of a flat part takes the keys named like its fields (others are ignored)."""

    def json_layout(self) -> dict:
        """This part as the report lays it out; values may still be results, tuples or numpy scalars."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def to_json(self) -> dict:
        """This part of the report in plain JSON types; ValueError on a non-finite number."""
        return json_ready(self, type(self).__name__)

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]):
        return cls(**{f.name: obj[f.name] for f in fields(cls) if f.name in obj})


@dataclass(frozen=True)
class NormStats(ReportPart):
    """Lengths (L2 norms) of the track vectors."""

    mean: float
    std: float
    min: float
    max: float


@dataclass(frozen=True)
class Quality(ReportPart):
    """Health of the track vectors [n_tracks, n_features]."""

    norm: NormStats
    constant_dimensions: int  # features equal for every track
    anisotropy: float  # mean raw cosine similarity of track pairs; near 1 when a shared component dominates

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> Quality:
        return cls(NormStats.from_json(obj["norm"]), obj["constant_dimensions"], obj["anisotropy"])


@dataclass(frozen=True)
class Dimension(ReportPart):
    """PCA and intrinsic dimension of the track vectors [n_tracks, n_features]; None where there is no variance."""

    n_tracks: int
    n_features: int
    # Every component, largest first: float [min(n_tracks - 1, n_features)]; the report lists the first 50.
    explained_variance_ratio: tuple[float, ...]
    pca_components_90: int | None
    pca_components_95: int | None
    participation_ratio: float | None
    intrinsic_dimension: float | None  # TwoNN

    def json_layout(self) -> dict:
        return {**super().json_layout(),
                "explained_variance_ratio": self.explained_variance_ratio[:MAX_LISTED_COMPONENTS]}

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> Dimension:
        return super().from_json({**obj, "explained_variance_ratio": _floats(obj["explained_variance_ratio"])})


@dataclass(frozen=True)
class Exemplar(ReportPart):
    """A cluster's exemplar: the cosine medoid of its tracks."""

    cluster: int
    track_id: str
    relative_path: str


@dataclass(frozen=True)
class Clustering(ReportPart):
    """One clustering of the tracks, clusters numbered 0, 1, ... by decreasing size (each track's cluster is in
    its ``TrackResult``). Scores are None where undefined (fewer than 2 clusters, or one per track)."""

    n_clusters: int
    sizes: tuple[int, ...]
    exemplars: tuple[Exemplar, ...]
    silhouette: float | None  # cosine, in [-1, 1], higher is better
    calinski_harabasz: float | None  # higher is better
    davies_bouldin: float | None  # lower is better

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]):
        return super().from_json({**obj, "sizes": tuple(obj["sizes"]),
                                  "exemplars": tuple(Exemplar.from_json(e) for e in obj["exemplars"])})


@dataclass(frozen=True)
class KMeansClustering(Clustering):
    chosen_by: str  # "given" or "silhouette"
    silhouette_by_k: Mapping[int, float]  # empty when k was given
    note: str | None = None  # why k = 2 when no k gave a defined silhouette

    def json_layout(self) -> dict:
        layout = super().json_layout()
        del layout["note"]
        return {**layout, **_optional("note", self.note)}

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> KMeansClustering:
        return super().from_json({**obj, "silhouette_by_k": {int(k): v for k, v in obj["silhouette_by_k"].items()}})


@dataclass(frozen=True)
class WardClustering(Clustering):
    linkage: str


@dataclass(frozen=True)
class DbscanClustering(Clustering):
    eps: float
    min_samples: int
    n_noise: int  # tracks in no cluster (their cluster is -1)


@dataclass(frozen=True)
class SkippedClustering(ReportPart):
    skipped: str  # why the method did not run


def _clustering_or_skipped(kind: type[Clustering], obj: Mapping[str, Any]) -> Clustering | SkippedClustering:
    return SkippedClustering.from_json(obj) if "skipped" in obj else kind.from_json(obj)


@dataclass(frozen=True)
class Clusters(ReportPart):
    """k-means (the report's main clustering, its keys at the top of the section), agglomerative and DBSCAN."""

    kmeans: KMeansClustering
    agglomerative: WardClustering | SkippedClustering
    dbscan: DbscanClustering | SkippedClustering

    def json_layout(self) -> dict:
        return {**self.kmeans.json_layout(), "agglomerative": self.agglomerative, "dbscan": self.dbscan}

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> Clusters:
        return cls(KMeansClustering.from_json(obj), _clustering_or_skipped(WardClustering, obj["agglomerative"]),
                   _clustering_or_skipped(DbscanClustering, obj["dbscan"]))


@dataclass(frozen=True)
class Outlier(ReportPart):
    track_id: str
    relative_path: str
    score: float


@dataclass(frozen=True)
class Outliers(ReportPart):
    """Tracks whose local outlier factor is above ``threshold``, most isolated first."""

    threshold: float
    tracks: tuple[Outlier, ...]

    def json_layout(self) -> dict:
        return {"threshold": self.threshold, "score": OUTLIER_SCORE, "tracks": self.tracks}

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> Outliers:
        return cls(obj["threshold"], tuple(Outlier.from_json(t) for t in obj["tracks"]))


@dataclass(frozen=True)
class DuplicatePair(ReportPart):
    a: str  # relative path
    b: str
    a_track_id: str
    b_track_id: str
    similarity: float  # centred cosine


@dataclass(frozen=True)
class NearDuplicates(ReportPart):
    """Track pairs whose centred cosine similarity is at least ``min_similarity``."""

    min_similarity: float
    count: int  # all such pairs
    pairs: tuple[DuplicatePair, ...]  # the most similar ones, at most MAX_LISTED

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> NearDuplicates:
        return cls(obj["min_similarity"], obj["count"], tuple(DuplicatePair.from_json(p) for p in obj["pairs"]))


@dataclass(frozen=True)
class PairwiseSimilarity(ReportPart):
    """Distribution of the centred cosine similarities of track pairs (of a sample in large datasets)."""

    pairs: int
    mean: float
    std: float
    quantiles: Mapping[str, float]  # "0.01", "0.25", "0.5", "0.75", "0.99"


@dataclass(frozen=True)
class Diversity(ReportPart):
    n_tracks: int
    mean_pairwise_cosine_distance: float
    vendi_score: float  # of the centred vectors: the effective number of distinct tracks
    vendi_score_raw: float
    mean_cosine_similarity_raw: float
    pairwise_similarity: PairwiseSimilarity
    vendi_score_by_cluster: Mapping[int, float]  # k-means cluster -> its centred Vendi score

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> Diversity:
        return super().from_json({
            **obj, "pairwise_similarity": PairwiseSimilarity.from_json(obj["pairwise_similarity"]),
            "vendi_score_by_cluster": {int(c): v for c, v in obj["vendi_score_by_cluster"].items()}})


@dataclass(frozen=True)
class LabelMetrics(ReportPart):
    """How one label column agrees with the clusters and with nearest neighbours, on its labelled tracks."""

    n_labelled: int
    classes: Mapping[str, int]  # label -> tracks
    adjusted_rand_index: float | None
    normalized_mutual_info: float | None
    knn_accuracy: float | None  # leave-one-out k-NN
    majority_class_accuracy: float | None
    note: str | None = None  # why the metrics are undefined

    def json_layout(self) -> dict:
        layout = super().json_layout()
        del layout["note"]
        return {**layout, **_optional("note", self.note)}


@dataclass(frozen=True)
class LabelResults(ReportPart):
    source: str | None  # the labels CSV, "top folder of each file", or None without labels
    columns: Mapping[str, LabelMetrics]

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> LabelResults:
        return cls(obj["source"], {c: LabelMetrics.from_json(m) for c, m in obj["columns"].items()})


@dataclass(frozen=True)
class LabelCoverage(ReportPart):
    n_tracks: int
    share: float  # of the labelled tracks
    spread: float | None  # mean cosine distance of its tracks to their mean direction
    nearest_label: str | None
    nearest_label_distance: float | None


@dataclass(frozen=True)
class UnderCovered(ReportPart):
    label: str
    n_tracks: int
    reason: str


@dataclass(frozen=True)
class Coverage(ReportPart):
    """How the tracks cover one label column, in the centred cosine geometry."""

    n_labelled: int
    n_unlabelled: int
    labels: Mapping[str, LabelCoverage]
    centroid_labels: tuple[str, ...]
    centroid_distances: tuple[tuple[float | None, ...], ...]  # cosine distances of the label means, in that order
    silhouette: float | None
    knn_agreement: float | None
    under_covered: tuple[UnderCovered, ...]

    def json_layout(self) -> dict:
        layout = super().json_layout()
        del layout["centroid_labels"]
        layout["centroid_distances"] = {"labels": self.centroid_labels, "matrix": self.centroid_distances}
        return layout

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> Coverage:
        distances = obj["centroid_distances"]
        return cls(obj["n_labelled"], obj["n_unlabelled"],
                   {name: LabelCoverage.from_json(c) for name, c in obj["labels"].items()},
                   tuple(distances["labels"]), _matrix(distances["matrix"]), obj["silhouette"],
                   obj["knn_agreement"], tuple(UnderCovered.from_json(u) for u in obj["under_covered"]))


@dataclass(frozen=True)
class LayerMetrics(ReportPart):
    """The metrics of one hidden state (0 = CNN front end), on the sampled tracks."""

    layer: int
    silhouette: float | None  # of k-means on this layer
    knn_accuracy: Mapping[str, float | None]  # label column -> leave-one-out k-NN accuracy
    vendi_score: float
    mean_pairwise_cosine_distance: float
    anisotropy: float
    norm: NormStats
    constant_dimensions: int
    n_outliers: int
    n_near_duplicates: int
    intrinsic_dimension: float | None
    pca_components_90: int | None
    pca_components_95: int | None
    participation_ratio: float | None
    explained_variance_ratio: tuple[float, ...]  # every component; the report lists the first 50

    def json_layout(self) -> dict:
        return {**super().json_layout(),
                "explained_variance_ratio": self.explained_variance_ratio[:MAX_LISTED_COMPONENTS]}

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> LayerMetrics:
        return super().from_json({**obj, "norm": NormStats.from_json(obj["norm"]),
                                  "explained_variance_ratio": _floats(obj["explained_variance_ratio"])})


@dataclass(frozen=True)
class MethodScores(ReportPart):
    method: str
    n_features: int
    knn_label_agreement: Mapping[str, float | None]  # label column -> leave-one-out k-NN agreement
    anisotropy: float
    effective_dimension: float | None  # participation ratio of the PCA spectrum


@dataclass(frozen=True)
class MethodComparison(ReportPart):
    """Ways to represent the same tracks, compared (see ``representations``)."""

    n_tracks: int
    methods: tuple[MethodScores, ...]
    cka: tuple[tuple[float | None, ...], ...]  # linear CKA of every pair of methods, in the order of ``methods``
    note: str | None = None  # which tracks the comparison left out

    def json_layout(self) -> dict:
        return {"n_tracks": self.n_tracks, "methods": self.methods,
                "cka": {"methods": [m.method for m in self.methods], "matrix": self.cka},
                "geometry": METHOD_GEOMETRY, **_optional("note", self.note)}

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> MethodComparison:
        return cls(obj["n_tracks"], tuple(MethodScores.from_json(m) for m in obj["methods"]),
                   _matrix(obj["cka"]["matrix"]), obj.get("note"))


@dataclass(frozen=True)
class SkippedSource(ReportPart):
    track_id: str
    relative_path: str
    reason: str


@dataclass(frozen=True)
class BaselineComparison(ReportPart):
    """The MFCC + chroma baseline and how it compares; ``reason`` says why it is unavailable (None: available)."""

    reason: str | None
    features: str | None = None  # what the baseline vectors are; None when it was not requested
    n_tracks: int = 0  # tracks whose source audio gave baseline features
    skipped: tuple[SkippedSource, ...] = ()  # at most MAX_LISTED
    n_skipped: int = 0
    n_clusters: int | None = None
    silhouette: float | None = None
    agreement_with_embedding_clusters_ari: float | None = None
    labels: Mapping[str, LabelMetrics] = field(default_factory=dict)

    @property
    def available(self) -> bool:
        return self.reason is None

    def json_layout(self) -> dict:
        if self.features is None:
            return {"available": False, "reason": self.reason}
        layout = {"features": self.features, "n_tracks": self.n_tracks, "skipped": self.skipped,
                  "n_skipped": self.n_skipped, "available": self.available}
        if not self.available:
            return {**layout, "reason": self.reason}
        return {**layout, "n_clusters": self.n_clusters, "silhouette": self.silhouette,
                "agreement_with_embedding_clusters_ari": self.agreement_with_embedding_clusters_ari,
                "labels": self.labels}

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> BaselineComparison:
        return super().from_json({**obj, "reason": obj.get("reason"),
                                  "skipped": tuple(SkippedSource.from_json(s) for s in obj.get("skipped", ())),
                                  "labels": {c: LabelMetrics.from_json(m) for c, m in obj.get("labels", {}).items()}})


@dataclass(frozen=True)
class TrackResult(ReportPart):
    """One track's place in the analysis."""

    track_id: str
    relative_path: str
    cluster: int  # k-means
    cluster_agglomerative: int | None  # None when that method was skipped
    cluster_dbscan: int | None  # -1: noise; None when skipped
    outlier_score: float
    map: tuple[float, float]  # principal coordinates on the PCA map
    labels: Mapping[str, str | None]  # label column -> this track's label

    def json_layout(self) -> dict:
        return {"track_id": self.track_id, "relative_path": self.relative_path, "cluster": self.cluster,
                **_optional("cluster_agglomerative", self.cluster_agglomerative),
                **_optional("cluster_dbscan", self.cluster_dbscan),
                "outlier_score": self.outlier_score, "map": self.map, "labels": self.labels}

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> TrackResult:
        return cls(obj["track_id"], obj["relative_path"], obj["cluster"], obj.get("cluster_agglomerative"),
                   obj.get("cluster_dbscan"), obj["outlier_score"], tuple(obj["map"]), obj["labels"])


@dataclass(frozen=True)
class ReportFiles(ReportPart):
    report: Path
    plots: Mapping[str, Path]  # plot name -> PNG file

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> ReportFiles:
        return cls(Path(obj["report"]), {name: Path(p) for name, p in obj["plots"].items()})


_SECTIONS = {"quality": Quality, "clusters": Clusters, "outliers": Outliers, "near_duplicates": NearDuplicates,
             "dimension": Dimension, "diversity": Diversity, "labels": LabelResults,
             "method_comparison": MethodComparison, "baseline": BaselineComparison}


@dataclass(frozen=True)
class AnalysisReport(ReportPart):
    """The analysis of a dataset's track embeddings (the mean over hidden states, and each hidden state).

    ``to_json()`` is ``report.json``. ``from_json`` of it gives back every field but two plot inputs the file does
    not hold in full: ``map_variance`` (then empty) and the explained variance beyond the first 50 components.
    """

    format_version: int
    mess_ai_version: str
    created_at: str  # ISO 8601, UTC
    store: str
    dataset: str
    n_tracks: int
    model: str | None
    config_key: str | None
    n_hidden_states: int
    hidden_size: int
    fingerprint: str  # of the set of tracks, their bytes and their extraction config
    random_state: int
    representation: str  # which vectors, in which geometry, the sections below describe
    quality: Quality
    clusters: Clusters
    outliers: Outliers
    near_duplicates: NearDuplicates
    dimension: Dimension
    diversity: Diversity
    labels: LabelResults
    coverage: Mapping[str, Coverage]  # label column -> coverage; empty without labels
    per_layer: tuple[LayerMetrics, ...]
    method_comparison: MethodComparison
    baseline: BaselineComparison
    tracks: tuple[TrackResult, ...]  # in the dataset's order (by relative path)
    notes: tuple[str, ...]
    files: ReportFiles | None = None  # None until the report is written
    map_variance: tuple[float, ...] = ()  # fraction of the variance along each axis of the PCA map

    def json_layout(self) -> dict:
        layout = super().json_layout()
        del layout["format_version"], layout["files"], layout["map_variance"]
        return {"format": self.format_version, **layout, **_optional("files", self.files)}

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> AnalysisReport:
        sections = {key: kind.from_json(obj[key]) for key, kind in _SECTIONS.items()}
        return super().from_json({
            **obj, **sections, "format_version": obj["format"],
            "coverage": {c: Coverage.from_json(v) for c, v in obj["coverage"].items()},
            "per_layer": tuple(LayerMetrics.from_json(m) for m in obj["per_layer"]),
            "tracks": tuple(TrackResult.from_json(t) for t in obj["tracks"]), "notes": tuple(obj["notes"]),
            "files": ReportFiles.from_json(obj["files"]) if "files" in obj else None})
