"""The ``analyze-embeddings`` flow: analysis of a dataset's embeddings, with its metrics and plots as artifacts."""

from __future__ import annotations

from typing import Any

from prefect import flow

from tasks.analysis import analyze_embeddings
from tasks.reporting import publish_analysis_artifacts


@flow(name="analyze-embeddings", log_prints=False)
def analyze_store(
    store: str,
    dataset: str | None = None,
    labels_csv: str | None = None,
    n_clusters: int | None = None,
    random_state: int = 0,
    baseline: bool = True,
    manifest_url: str | None = None,
) -> dict[str, Any]:
    """Analyse the embeddings of one dataset of a store: clusters, outliers, near-duplicates, dimension, diversity.

    Args:
        store: Feature store folder.
        dataset: Dataset inside the store; empty when the store has just one.
        labels_csv: CSV with a 'file' column (file name, relative path or track id) and label columns.
        n_clusters: Number of clusters; empty to choose it by silhouette.
        random_state: Seed for everything random (k-means, sampling).
        baseline: Also compute the MFCC + chroma baseline from the source audio (cached after the first run).
        manifest_url: SQLAlchemy URL of the manifest; empty for the SQLite file in the store.
    """
    report = analyze_embeddings(store, dataset, labels_csv, n_clusters, random_state, baseline, manifest_url)
    publish_analysis_artifacts(report)
    return report
