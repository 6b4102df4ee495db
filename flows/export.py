"""The ``export-embeddings`` flow: a dataset's embeddings as Parquet tables, with what was written as an artifact."""

from __future__ import annotations

from typing import Any

from prefect import flow

from tasks.export import export_embeddings
from tasks.manifest import manifest_url_of_run
from tasks.notify import RUN_HOOKS


@flow(name="export-embeddings", log_prints=False, **RUN_HOOKS)
def export_store(
    store: str,
    out: str,
    dataset: str | None = None,
    layer: str = "all",
    manifest_url: str | None = None,
    manifest_secret: str | None = None,
    time_limit_minutes: float = 60.0,
) -> dict[str, Any]:
    """Export the embeddings of one dataset of a store to ``<out>/<dataset>/`` as Parquet tables (one row per track,
    one row per window), rewriting only the parts whose tracks changed since the last export there. Returns what
    was written, kept and removed.

    Args:
        store: Feature store folder.
        out: Folder of exports; the dataset's tables go to <out>/<dataset>/.
        dataset: Dataset inside the store; empty when the store has just one.
        layer: 'all' (one column per hidden state: layer_0, layer_1, ...), 'mean' or a hidden-state index such as
            '6' (one column: embedding).
        manifest_url: SQLAlchemy URL of the manifest, without a password (one is refused: parameters are stored
            and shown by Prefect); empty for the secret below, else the worker's MESS_AI_MANIFEST_URL, else the
            SQLite file in the store.
        manifest_secret: Name of a Prefect Secret block holding the manifest URL (a URL with a password goes
            there or in the worker's MESS_AI_MANIFEST_URL); empty for none.
        time_limit_minutes: The export stops (Failed) if it takes longer than this.
    """
    summary = export_embeddings(store, out, dataset, layer, manifest_url_of_run(manifest_url, manifest_secret),
                                time_limit_minutes * 60)
    return summary.to_dict()
