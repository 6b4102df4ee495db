"""The ``analyze-embeddings`` flow: analysis of a dataset's embeddings, with its metrics and plots as artifacts."""

from __future__ import annotations

from typing import Any

from prefect import flow

from tasks.analysis import analyze_embeddings
from tasks.manifest import manifest_url_of_run
from tasks.notify import RUN_HOOKS
from tasks.reporting import publish_analysis_artifacts


@flow(name="analyze-embeddings", log_prints=False, **RUN_HOOKS)
def analyze_store(
    store: str,
    dataset: str | None = None,
    labels_csv: str | None = None,
    n_clusters: int | None = None,
    random_state: int = 0,
    baseline: bool = True,
    manifest_url: str | None = None,
    manifest_secret: str | None = None,
    time_limit_minutes: float = 60.0,
) -> dict[str, Any]:
    """Analyse the embeddings of one dataset of a store: clusters, outliers, near-duplicates, dimension, diversity.
    Returns the report as written to ``<store>/<dataset>/reports/report.json``.

    Args:
        store: Feature store folder.
        dataset: Dataset inside the store; empty when the store has just one.
        labels_csv: CSV with a 'file' column (file name, relative path or track id) and label columns.
        n_clusters: Number of clusters; empty to choose it by silhouette.
        random_state: Seed for everything random (k-means, sampling).
        baseline: Also compute the MFCC + chroma baseline from the source audio (cached after the first run).
        manifest_url: SQLAlchemy URL of the manifest, without a password (one is refused: parameters are stored
            and shown by Prefect); empty for the secret below, else the worker's MESS_AI_MANIFEST_URL, else the
            SQLite file in the store.
        manifest_secret: Name of a Prefect Secret block holding the manifest URL (a URL with a password goes
            there or in the worker's MESS_AI_MANIFEST_URL); empty for none.
        time_limit_minutes: The analysis stops (Failed) if it takes longer than this.
    """
    report = analyze_embeddings(store, dataset, labels_csv, n_clusters, random_state, baseline,
                                manifest_url_of_run(manifest_url, manifest_secret), time_limit_minutes * 60)
    document = report.to_json()
    publish_analysis_artifacts(report)
    return document
