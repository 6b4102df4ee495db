"""Settings for starting flow runs from a process of ours (the CLI, the watcher), before Prefect is imported."""

from __future__ import annotations

import os

# The deployment whose runs the folder watcher starts (prefect.yaml).
DEFAULT_WATCH_DEPLOYMENT = "extract-features/on-new-audio"


def prepare_prefect(verbose: bool) -> None:
    """Settings for an in-process Prefect run, before prefect is imported: a start-up time-out long enough for
    a first start of the ephemeral API (unless PREFECT_API_URL points at a server), no analytics, and Prefect's
    own log lines only when asked for (-v)."""
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    if not verbose:
        os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    # The pipeline's own log lines reach the Prefect UI with the flow's.
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "mess_ai")


def default_gpu_limit() -> str:
    """'gpu' when a Prefect server is configured; none on the temporary in-process API, whose lease cleanup does
    not run: a slot held by a run killed there would block later runs for good (chunks of one process still
    take turns on the model through a local lock)."""
    from prefect.settings import PREFECT_API_URL

    return "gpu" if PREFECT_API_URL.value() else ""
