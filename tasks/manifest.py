"""The manifest URL of a flow run, with its password kept out of Prefect: read from a Secret block or the worker's
environment, never from a flow parameter (``mess_ai.store.manifest.resolve_manifest_url`` decides the order)."""

from __future__ import annotations

from prefect.blocks.system import Secret

from mess_ai.store.manifest import resolve_manifest_url


def manifest_url_of_run(manifest_url: str | None, manifest_secret: str | None) -> str | None:
    """The URL for the flow parameters ``manifest_url`` and ``manifest_secret`` (the name of a Secret block).

    Not a task: a task's return value can be persisted by Prefect, and this one may carry a password."""
    secret = str(Secret.load(manifest_secret).get()) if manifest_secret else None
    return resolve_manifest_url(manifest_url, secret)
