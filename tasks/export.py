"""Prefect task for the Parquet export: a thin wrapper over ``mess_ai.export.export_parquet`` that publishes what
it wrote as a Markdown artifact."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from mess_ai.deadline import run_within
from mess_ai.export import EXPORT_LAYERS, ExportSummary, export_parquet
from mess_ai.reporting import artifact_key
from mess_ai.store.layers import parse_layer


@task(name="export-embeddings", cache_policy=NO_CACHE)
def export_embeddings(store: str, out: str, dataset: str | None, layer: str, manifest_url: str | None,
                      time_limit_seconds: float = 3600.0) -> ExportSummary:
    """Export a dataset's embeddings to ``<out>/<dataset>/`` as Parquet (only the parts that changed), within
    ``time_limit_seconds`` (else ``StageTimeout``); ``layer``: "all", "mean" or a hidden-state index as text."""
    chosen = parse_layer(layer, EXPORT_LAYERS)
    summary = run_within(lambda: export_parquet(store, out, dataset, chosen, manifest_url), time_limit_seconds,
                         "the export")
    get_run_logger().info("%s", summary.describe())
    create_markdown_artifact(summary.markdown(), key=artifact_key(summary.dataset, "export"),
                             description=f"Parquet export of {summary.tracks} tracks ({summary.dataset})")
    return summary
