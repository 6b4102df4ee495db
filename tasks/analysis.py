"""Prefect task for embedding analysis: a thin wrapper over ``mess_ai.analysis.run_analysis``."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from mess_ai.analysis import AnalysisReport, run_analysis
from mess_ai.deadline import run_within


@task(name="analyze-embeddings", cache_policy=NO_CACHE)
def analyze_embeddings(store: str, dataset: str | None, labels_csv: str | None, n_clusters: int | None,
                       random_state: int, baseline: bool, manifest_url: str | None,
                       time_limit_seconds: float = 3600.0) -> AnalysisReport:
    """Clusters, outliers, duplicates, dimension and diversity of a dataset; writes the report and plots, within
    ``time_limit_seconds`` (else ``StageTimeout``)."""
    report = run_within(lambda: run_analysis(store, dataset, labels_csv=labels_csv, n_clusters=n_clusters,
                                             random_state=random_state, baseline=baseline,
                                             manifest_url=manifest_url),
                        time_limit_seconds, "the analysis")
    get_run_logger().info("Analysed %d tracks of '%s': %d clusters, %d outliers, %d near-duplicate pairs; "
                          "report in %s.", report.n_tracks, report.dataset, report.clusters.kmeans.n_clusters,
                          len(report.outliers.tracks), report.near_duplicates.count, report.files.report)
    return report
