"""The ``extract-sharded`` flow: scale-out over Prefect itself.

The parent decides what is new, splits it into shards and starts each shard as a child flow run of the ``shard``
deployment; the work pool's workers, on any number of machines, pick them up. Safety comes from the shared store
and manifest (PostgreSQL across machines): per-track claims keep two workers off the same file, and each host's
model work is limited by its own concurrency limit (``gpu:<host>``).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.client.orchestration import get_client
from prefect.deployments import run_deployment

from mess_ai.deadline import Deadline, StageTimeout, TimeLimits
from mess_ai.config import ExtractConfig
from mess_ai.pipeline import ExtractionSession
from mess_ai.store import DONE, FAILED
from mess_ai.store.manifest import path_text
from tasks.manifest import manifest_url_of_run
from tasks.notify import RUN_HOOKS


def split_into_shards(paths: list[str], sizes: dict[str, int], shards: int) -> list[list[str]]:
    """Greedy balance by bytes: the largest files first, each to the lightest shard. Empty shards are dropped."""
    if shards < 1:
        raise ValueError(f"shards must be at least 1, got {shards}")
    buckets: list[tuple[int, list[str]]] = [(0, []) for _ in range(shards)]
    for path in sorted(paths, key=lambda p: -sizes.get(p, 0)):
        index = min(range(shards), key=lambda i: buckets[i][0])
        total, members = buckets[index]
        buckets[index] = (total + sizes.get(path, 0), members + [path])
    return [sorted(members) for _, members in buckets if members]


@flow(name="extract-sharded", log_prints=False, **RUN_HOOKS)
def extract_sharded(
    audio_dir: str,
    store: str,
    dataset: str | None = None,
    config: ExtractConfig = ExtractConfig(),
    shards: int = 2,
    deployment: str = "extract-features/shard",
    manifest_url: str | None = None,
    manifest_secret: str | None = None,
    poll_seconds: float = 5.0,
    run_time_limit_hours: float | None = None,
) -> dict[str, Any]:
    """Split new or changed recordings into shards, each extracted by a child flow run on the work pool.

    Args:
        audio_dir: Folder of recordings, visible at the same path to every worker.
        store: Feature store folder, visible at the same path to every worker.
        dataset: Dataset name inside the store; default: the audio folder's name.
        config: How features are extracted (the model must be at the same path on every worker); the shards
            plan and extract with this one config, so their content keys agree with the plan's.
        shards: Number of child runs; one or two per GPU worker is a good start.
        deployment: The deployment that extracts one shard.
        manifest_url: SQLAlchemy URL of the shared manifest, without a password (one is refused: parameters are
            stored and shown by Prefect); empty for the secret below, else the workers' MESS_AI_MANIFEST_URL
            (PostgreSQL across machines), else the SQLite file in the store.
        manifest_secret: Name of a Prefect Secret block holding the manifest URL; empty for none. The shard runs
            get the two parameters as given, never a URL read from the secret or the environment.
        poll_seconds: How often to check on the child runs.
        run_time_limit_hours: How long to wait for the shards; empty: derived from the files' sizes (a shard's
            own time limits end it sooner: see extract-features).
    """
    logger = get_run_logger()
    dataset = dataset or Path(audio_dir).absolute().name
    url = manifest_url_of_run(manifest_url, manifest_secret)
    session = ExtractionSession(store, dataset, config, manifest_url=url)
    try:
        pending = session.plan(session.discover(audio_dir))
    finally:
        session.close()
    sizes = {s.relative: s.path.stat().st_size for s in pending}
    parts = split_into_shards(list(sizes), sizes, shards)
    logger.info("%d new or changed files in %d shards.", len(pending), len(parts))
    runs = [run_deployment(deployment, timeout=0, parameters={
        "audio_dir": audio_dir, "store": store, "dataset": dataset, "config": config.model_dump(), "files": part,
        "manifest_url": manifest_url, "manifest_secret": manifest_secret}) for part in parts]
    limit = run_time_limit_hours * 3600 if run_time_limit_hours else _shards_limit(sum(sizes.values()), len(sizes))
    states = _wait(runs, poll_seconds, Deadline(limit))
    session = ExtractionSession(store, dataset, config, manifest_url=url)
    try:
        rows = {r["relative_path"]: r["status"] for r in session.store.manifest.rows(dataset)}
    finally:
        session.close()
    result = {
        "shards": len(parts), "files": len(pending),
        "done": sum(rows.get(path_text(p)) == DONE for p in sizes),
        "failed": sum(rows.get(path_text(p)) == FAILED for p in sizes),
        "child_runs": {str(run.id): state for run, state in zip(runs, states)},
    }
    logger.info("Shards finished: %d done, %d failed of %d files.", result["done"], result["failed"], len(pending))
    failed_runs = [s for s in states if s != "COMPLETED"]
    if failed_runs:
        raise RuntimeError(f"{len(failed_runs)} of {len(runs)} shard runs did not complete: {failed_runs}")
    return result


# Compressed audio can hold a second in as little as this many bytes (64 kbit/s): sizes give an upper bound of
# the audio seconds, hence of the time the shards may need.
_MIN_BYTES_PER_AUDIO_SECOND = 8000


def _shards_limit(total_bytes: int, files: int) -> float:
    """The shards' time limits (see ``TimeLimits``) for at most this much audio, one shard after the other."""
    limits = TimeLimits()
    return limits.run([limits.chunk(total_bytes / _MIN_BYTES_PER_AUDIO_SECOND, files)], files)


def _wait(runs: list, poll_seconds: float, deadline: Deadline) -> list[str]:
    """The final state of each child run, waiting for all of them until ``deadline``."""
    final: dict[Any, str] = {}
    with get_client(sync_client=True) as client:
        while len(final) < len(runs):
            if deadline.passed():
                raise StageTimeout("the shard runs", deadline.seconds,
                                   f"waiting for {len(runs) - len(final)} of {len(runs)} to finish")
            for run in runs:
                if run.id not in final:
                    state = client.read_flow_run(run.id).state
                    if state is not None and state.is_final():
                        final[run.id] = state.type.value
            if len(final) < len(runs):
                time.sleep(poll_seconds)
    return [final[run.id] for run in runs]
