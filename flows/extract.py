"""The ``extract-features`` flow: new or changed recordings → MERT features in the store, with artifacts."""

from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.futures import PrefectFuture
from prefect.utilities.annotations import quote

from mess_ai.config import ExtractConfig, RunOptions
from mess_ai.deadline import Deadline, StageTimeout, TimeLimits
from mess_ai.features.device import run_devices
from mess_ai.monitoring import ResourceMonitor
from mess_ai.pipeline import ExtractionSession, chunk_sources
from tasks.extraction import (
    GpuSlot,
    TransientFileErrors,
    check_integrity,
    discover_files,
    ensure_concurrency_limit,
    process_chunk,
    validate_files,
)
from tasks.manifest import manifest_url_of_run
from tasks.notify import RUN_HOOKS, announce_outcome
from tasks.reporting import publish_run_artifacts, start_progress, update_progress


@flow(name="extract-features", log_prints=False, **RUN_HOOKS)
def extract_features(
    audio_dir: str,
    store: str,
    dataset: str | None = None,
    config: ExtractConfig = ExtractConfig(),
    run: RunOptions = RunOptions(),
    only_failed: bool = False,
    files: list[str] | None = None,
    reextract: bool = False,
    run_analysis: bool = False,
    manifest_url: str | None = None,
    manifest_secret: str | None = None,
) -> dict[str, Any]:
    """Extract MERT-v1 embeddings for every new or changed recording under a folder.

    Args:
        audio_dir: Folder of recordings, searched recursively (wav, flac, ogg, mp3, aif, aiff).
        store: Feature store folder; features go to <store>/<dataset>/{segments,aggregated,raw}.
        dataset: Dataset name inside the store; default: the audio folder's name. A dataset holds one folder's
            recordings, extracted with one config.
        config: How features are extracted (the model, the windows, the precision, the limits on input files);
            each field is described in the form.
        run: How the run goes (chunks of work, the GPU concurrency slot, retries, time limits).
        only_failed: Re-run only the files whose last attempt failed.
        files: Only these files (paths relative to audio_dir); empty for all. Used by the shards of a scaled-out run.
        reextract: The dataset holds features of another config (model weights, window, hop, precision) than
            this run's: replace them (its tracks are redone as the run reaches them). Without it such a run is
            refused; to keep both, name another dataset instead.
        run_analysis: Run the embedding analysis on the dataset afterwards.
        manifest_url: SQLAlchemy URL of the manifest, without a password (one is refused: parameters are stored
            and shown by Prefect); empty for the secret below, else the worker's MESS_AI_MANIFEST_URL, else the
            SQLite file in the store.
        manifest_secret: Name of a Prefect Secret block holding the manifest URL (a URL with a password goes
            there or in the worker's MESS_AI_MANIFEST_URL); empty for none.
    """
    logger = get_run_logger()
    started = time.perf_counter()
    gpu_limit = run.gpu_limit.replace("{host}", socket.gethostname()) if run.gpu_limit else run.gpu_limit
    url = manifest_url_of_run(manifest_url, manifest_secret)
    monitor = ResourceMonitor(run_devices(config.device))
    session = ExtractionSession(store, dataset or Path(audio_dir).absolute().name, config,
                                manifest_url=url, monitor=monitor, reextract=reextract,
                                decode_workers=run.decode_workers)
    limits = TimeLimits(base_seconds=run.time_limit_base_seconds,
                        seconds_per_audio_second=run.time_limit_per_audio_second,
                        chunk_seconds=run.chunk_time_limit_seconds,
                        run_seconds=run.run_time_limit_hours * 3600 if run.run_time_limit_hours else None)
    chunk_task = process_chunk.with_options(
        retries=run.retries, retry_delay_seconds=[run.retry_delay_seconds * 2 ** i for i in range(run.retries)])
    stopped: BaseException | None = None
    problems: list[str] = []
    slot = GpuSlot(None)
    try:
        with monitor:
            # One model worker per device, at most as many as the limit has slots (a limit of none, paused by an
            # operator, still has one waiting).
            workers = len(session.devices)
            if gpu_limit:
                slots = ensure_concurrency_limit(gpu_limit, run.gpu_slots, session.devices)
                workers = max(1, min(workers, slots))
                slot = GpuSlot(gpu_limit, workers)
                # Taken in the background from now, while the folder is listed and planned and the model loads:
                # the API takes ~2 s to grant a slot while it records the run's task runs (SQLite), which after
                # the plan of a big folder, or after the model load, delayed the first window by as much. A run
                # that finds nothing to do gives it back at once.
                slot.take()
            else:
                slot = GpuSlot(None, workers)
            pending = discover_files(quote(session), audio_dir, only_failed, files, limits)
            if not pending:
                slot.release(settle_seconds=NOTHING_TO_DO_SLOT_SECONDS)
            valid = _validate(session, pending, limits) if pending else []
            if valid:
                suspects, others = session.isolate(valid)
                chunks = [[suspect] for suspect in suspects] + (chunk_sources(
                    others, balanced_files_per_chunk(len(others), run.files_per_task, workers + 1),
                    run.minutes_per_task * 60 if run.minutes_per_task else None, session.durations) if others else [])
                chunk_limits = [limits.chunk(sum(session.durations.get(s.track_id, 0.0) for s in chunk), len(chunk))
                                for chunk in chunks]
                run_limit = limits.run(chunk_limits, session.discovered)
                logger.info("Time limits: %s per chunk, %.1f h for the run.",
                            ", ".join(f"{c:.0f} s" for c in chunk_limits[:4]) + (" ..." if len(chunks) > 4 else ""),
                            run_limit / 3600)
                stopped = _extract_chunks(session, chunk_task, list(zip(chunks, chunk_limits)), slot,
                                          Deadline(run_limit, elapsed=time.perf_counter() - started),
                                          alone=len(suspects))
            if stopped is None:
                problems = check_integrity(quote(session), limits)
        summary = session.summary(audio_dir, time.perf_counter() - started, problems)
        publish_run_artifacts(summary, session.store)
    finally:
        slot.release()
        session.close()
    if stopped is not None:
        logger.error("The run stopped: %s. %s.", stopped, summary.counts.describe())
        raise stopped
    logger.info("Done: %s; %.2f h of audio in %.1f s.", summary.counts.describe(), summary.audio_seconds / 3600,
                summary.wall_seconds)
    result = summary.to_dict()
    if run_analysis:
        from flows.analyze import analyze_store

        result["analysis"] = analyze_store(store, summary.dataset, manifest_url=manifest_url,
                                           manifest_secret=manifest_secret)
    announce_outcome(summary)
    return result


# How long a run that finds nothing to do waits for the GPU slot it asked for as it started to be granted (and given
# back) or refused: the API grants one in milliseconds, or ~2 s when SQLite is busy (GpuSlot.release).
NOTHING_TO_DO_SLOT_SECONDS = 5.0


def balanced_files_per_chunk(files: int, files_per_task: int, in_flight: int = 2) -> int:
    """Files per chunk: at most ``files_per_task``, as even as the count allows, and at least as many chunks as
    run at once (``in_flight``, one per device plus one decoding) when there are files enough, so the chunks in
    flight share the work (20 files, 16 per task, one device: two chunks of 10, not 16 and 4, which left one of the
    two cores idle while the 16 decoded)."""
    if files_per_task < 1:
        raise ValueError(f"files per task must be at least 1, got {files_per_task}")
    chunks = max(min(files, in_flight), -(-files // files_per_task), 1)
    return max(1, -(-files // chunks))


def _validate(session: ExtractionSession, pending: list, limits: TimeLimits) -> list:
    try:
        return validate_files(quote(session), pending, limits)
    except StageTimeout as timeout:
        _record_timeout(session, timeout, pending)
        raise


def _record_timeout(session: ExtractionSession, timeout: StageTimeout, sources: list) -> None:
    """The file a stage was stuck on, when it was one file of ``sources``, is recorded as failed."""
    stuck = next((s for s in sources if s.track_id == timeout.track_id), None)
    if stuck is not None and timeout.track_id not in session.outcomes:
        session.record_timeout(timeout, stuck)


def _extract_chunks(session: ExtractionSession, chunk_task: Any, chunks: list[tuple[list, float]], slot: GpuSlot,
                    deadline: Deadline, alone: int = 0) -> BaseException | None:
    """Run one chunk more at a time than the run has devices (``slot.workers``: two for one device), so a chunk's
    decoding overlaps the others' model work and every device is kept fed (the decoded audio they hold is bounded
    by the session's audio in flight, see ``mess_ai.extraction.decoding``). The first ``alone`` chunks (one suspect file each: see
    ``ExtractionSession.isolate``) run one at a time, with nothing else in flight. The run's GPU slots are taken as
    the first chunks start decoding (unless the flow started taking them before), and given back after the last
    chunk, or when the run stops.

    Returns what stopped the run (the model or store unusable, a chunk or the run past its time limit), or None.
    A chunk past its limit records the file it was stuck on as failed; no chunk starts after that, the chunks in
    flight finish, and the files not reached are left for the next run.
    """
    logger = get_run_logger()
    in_flight: list[tuple[PrefectFuture, list, float]] = []
    fatal: BaseException | None = None

    def settle(future: PrefectFuture, chunk: list, limit: float) -> None:
        nonlocal fatal
        # The chunk ends within its limit (a stuck one raises StageTimeout); this bound is the last resort, for a
        # task that never started its work (the API unreachable, say).
        future.wait(timeout=max(1.0, min(limit, deadline.remaining())) + _GRACE_SECONDS)
        if future.state is None or not future.state.is_final():
            fatal = fatal or StageTimeout("a chunk", limit, "waiting for its task to finish")
        elif future.state.is_failed():
            error = future.state.result(raise_on_failure=False)
            if isinstance(error, TransientFileErrors):
                logger.warning("Giving up on %d files after their last retry; they are recorded as failed.",
                               len(error.outcomes))
            else:
                if isinstance(error, StageTimeout):
                    _record_timeout(session, error, chunk)
                fatal = fatal or error  # the run cannot go on: the flow fails
        update_progress(progress_id, session.counts())

    slot.take()  # before any API call of our own: the API is slow to grant slots while it records task runs
    try:
        progress_id = start_progress(session.store.dataset, session.counts())
        for index, (chunk, limit) in enumerate(chunks):
            while len(in_flight) == slot.workers + 1 or (in_flight and index <= alone):
                settle(*in_flight.pop(0))
            if fatal is None and deadline.passed():
                fatal = StageTimeout("the run", deadline.seconds,
                                     f"with {len(chunks) - index} of {len(chunks)} chunks not started")
            if fatal is not None:
                break
            in_flight.append((chunk_task.submit(quote(session), chunk, quote(slot), index, len(chunks), limit),
                              chunk, limit))
        for future, chunk, limit in in_flight:
            settle(future, chunk, limit)
    finally:
        slot.release()
    return fatal


_GRACE_SECONDS = 60.0
