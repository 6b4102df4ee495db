"""The extract-features flow called with flat settings, as tests name them: sorted into its ``config`` and ``run``
by the fields' names (``mess_ai.config.split_settings``); and how many flow runs the Prefect API holds."""

from __future__ import annotations

from typing import Any


def extract_flow(**values: Any) -> Any:
    """``extract_features`` with ``audio_dir``, ``store`` and any settings, e.g. ``model=..., device="cpu",
    files_per_task=2, return_state=True``."""
    from flows.extract import extract_features
    from mess_ai.config import split_settings

    config, run, rest = split_settings(**values)
    return extract_features(config=config, run=run, **rest)


def count_flow_runs() -> int:
    """The flow runs on the Prefect API of this process (``PREFECT_API_URL``)."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.count_flow_runs()
