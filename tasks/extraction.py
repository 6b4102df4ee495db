"""Prefect tasks for extraction: thin wrappers over the stages of ``mess_ai.pipeline.ExtractionSession``.

The session (store, manifest, model) lives in the flow's process and is handed to the tasks as it is: tasks run
in threads of that process, and nothing heavy goes through Prefect's caching or result machinery (NO_CACHE).
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import threading
from typing import Any, Iterator

import httpx
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.concurrency.sync import concurrency
from prefect.exceptions import MissingContextError, ObjectAlreadyExists, ObjectNotFound

from mess_ai.audio import AudioSource
from mess_ai.deadline import TimeLimits, run_within
from mess_ai.errors import InputError, MessError, TrackBusyError
from mess_ai.features.extractor import TrackJob
from mess_ai.pipeline import ExtractionSession, FileOutcome


class TransientFileErrors(MessError):
    """Some files of a chunk failed for reasons worth another try (I/O errors, GPU out of memory, ...)."""

    def __init__(self, outcomes: list[FileOutcome]) -> None:
        self.outcomes = outcomes
        names = ", ".join(f"{o.relative_path} ({o.stage}: {o.reason})" for o in outcomes[:5])
        more = f" and {len(outcomes) - 5} more" if len(outcomes) > 5 else ""
        super().__init__(f"{len(outcomes)} files failed for reasons worth retrying: {names}{more}")


def is_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Retry transient trouble only: bad input and an unusable model or store fail the same way every time."""
    exc = state.data if isinstance(state.data, BaseException) else state.result(raise_on_failure=False)
    if isinstance(exc, (TransientFileErrors, TrackBusyError, OSError)):
        return True
    if isinstance(exc, (InputError, MessError)):
        return False
    return type(exc).__name__ == "OutOfMemoryError"


def ensure_concurrency_limit(name: str, slots: int) -> None:
    """Create the global concurrency limit ``name`` with ``slots`` slots unless it exists (then it is left as
    an operator may have set it in the UI)."""
    logger = get_run_logger()
    with get_client(sync_client=True) as client:
        try:
            existing = client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            try:
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=slots))
                logger.info("Created the concurrency limit '%s' with %d slot(s) for model work.", name, slots)
            except ObjectAlreadyExists:
                pass  # another run created it at the same moment
            return
    if existing.limit != slots:
        logger.info("Concurrency limit '%s' exists with %d slot(s); keeping it (asked for %d).", name,
                    existing.limit, slots)


GPU_LEASE_SECONDS = 60
# How long a run waits for the API to come back to take its GPU slot (a server restart takes ~10 s).
SLOT_RETRY_SECONDS = 300.0


def _logger() -> Any:
    """The run's logger (its lines reach the UI), or this module's outside a run."""
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger(__name__)


def api_unreachable(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) says the Prefect API could not be reached or was restarting."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, httpx.TransportError):
            return True
        if isinstance(exc, httpx.HTTPStatusError) and exc.response.status_code in (502, 503, 504):
            return True
        exc = exc.__cause__ or exc.__context__
    return False
_local_locks: dict[str, threading.Lock] = {}
_local_locks_guard = threading.Lock()


def _local_lock(name: str | None) -> threading.Lock:
    with _local_locks_guard:
        return _local_locks.setdefault(name or "", threading.Lock())


class _SlotHolder(threading.Thread):
    """Holds one slot of the Prefect concurrency limit ``limit`` from its start until ``stop``.

    Prefect's ``concurrency`` context has to be left by the thread that entered it (it watches that thread, to
    cancel it when the lease cannot be renewed), while a run's chunks run in Prefect's worker threads: so the slot
    has a thread of its own. It runs in the flow's context (Prefect's settings and run live in context variables).
    """

    def __init__(self, limit: str, context: contextvars.Context) -> None:
        super().__init__(name=f"mess-ai-gpu-slot-{limit}", daemon=True)
        self.limit = limit
        self.context = context
        self.held = False
        self.settled = threading.Event()  # the slot is held, or will not be (error)
        self.error: BaseException | None = None
        self.failed_attempts = 0
        self._released = threading.Event()

    def run(self) -> None:
        self.context.run(self._hold)

    def _hold(self) -> None:
        delay, waited = 1.0, 0.0
        try:
            while True:
                try:
                    # A short lease: a run killed while holding the slot blocks the others for a minute, not
                    # Prefect's default five; while this thread lives, Prefect renews the lease in the background.
                    with concurrency(self.limit, occupy=1, strict=True, lease_duration=GPU_LEASE_SECONDS):
                        self.held = True
                        self.settled.set()
                        # Woken every second: when the lease cannot be renewed, Prefect cancels this thread with
                        # an exception raised at its next bytecode, which a wait without a timeout never reaches.
                        while not self._released.wait(1.0):
                            pass
                    return
                except BaseException as exc:  # noqa: BLE001 - handed to the chunk that waits for the slot
                    self.failed_attempts += 1
                    if self.held or self._released.is_set() or not api_unreachable(exc) \
                            or waited >= SLOT_RETRY_SECONDS:
                        self.error = exc
                        return
                    # The API is away (a server restart takes seconds): wait for it rather than fail the run.
                    _logger().warning("The Prefect API is unreachable; trying again in %.0f s to take the "
                                             "'%s' concurrency slot.", delay, self.limit)
                    self._released.wait(delay)
                    waited += delay
                    delay = min(2 * delay, 30.0)
        finally:
            self.held = False
            self.settled.set()

    def stop(self) -> None:
        """Give the slot back; waits for that only when the slot is held (not while still queueing for it)."""
        self._released.set()
        if self.held:
            self.join()


class GpuSlot:
    """The model for one flow run's chunks, one chunk at a time.

    Chunks of this process queue on a local lock, so they hand the model to each other at once. With a limit
    ``name``, the run first takes one slot of that Prefect concurrency limit, which other processes and machines
    share, and holds it across its chunks until ``release``: the API grants it in milliseconds when idle, but
    takes up to 2 s while it records the run's task runs, which taken per chunk was a third of the flow's own cost
    per audio hour (docs/benchmarks.md, overhead). ``take`` starts taking it in the background, so the wait
    overlaps the first chunks' decoding. Two runs still never do model work at once: the second waits for the
    first's release. A killed run stops renewing its lease, so its slot frees itself within ``GPU_LEASE_SECONDS``;
    a lease that cannot be renewed (the API gone) ends the hold, and the next chunk takes the slot again.
    """

    def __init__(self, name: str | None) -> None:
        self.name = name or None
        self._local = _local_lock(self.name)
        self._guard = threading.Lock()
        self._context = contextvars.copy_context()
        self._holder: _SlotHolder | None = None

    def take(self) -> None:
        """Start taking the run's slot, unless it is held or being taken; returns at once."""
        if self.name:
            self._current()

    def _current(self) -> _SlotHolder:
        with self._guard:
            if self._holder is None or (self._holder.settled.is_set() and not self._holder.held):
                if self._holder is not None and self._holder.error is not None:
                    _logger().warning("Lost the '%s' concurrency slot (%s); taking it again.", self.name,
                                             self._holder.error)
                self._holder = _SlotHolder(self.name, self._context.copy())
                self._holder.start()
            return self._holder

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        """Model work of one chunk: the run's slot (taken now unless held), then this process's lock."""
        if self.name:
            holder = self._current()
            holder.settled.wait()
            if not holder.held and holder.error is not None:
                raise holder.error
        with self._local:
            yield

    def release(self) -> None:
        """Give the run's slot back (at the end of its chunks)."""
        with self._guard:
            holder, self._holder = self._holder, None
        if holder is not None:
            holder.stop()


@task(name="discover-files", cache_policy=NO_CACHE)
def discover_files(session: ExtractionSession, audio_dir: str, only_failed: bool,
                   files: list[str] | None = None, limits: TimeLimits = TimeLimits()) -> list[AudioSource]:
    """Find audio files and keep the new or changed ones (or, with ``only_failed``, the failed ones); with
    ``files``, only those (paths relative to ``audio_dir``). Listing and planning each end within their limit."""
    logger = get_run_logger()
    def listing() -> list[AudioSource]:
        session.activity.set(f"listing {audio_dir}")  # in the thread run_within watches
        return session.discover(audio_dir)

    sources = run_within(listing, limits.stage(0), "listing the audio folder", session.activity)
    pending = run_within(lambda: session.plan(sources, only_failed, files), limits.stage(len(sources)),
                         "planning (which files are new or changed)", session.activity)
    logger.info("Found %d audio files in %s: %d to extract (%s).", len(sources), audio_dir, len(pending),
                session.counts().describe(finished=False))
    return pending


@task(name="validate-files", cache_policy=NO_CACHE)
def validate_files(session: ExtractionSession, sources: list[AudioSource],
                   limits: TimeLimits = TimeLimits()) -> list[AudioSource]:
    """Check headers; unusable files are recorded as failed with the reason, the rest go on."""
    valid = run_within(lambda: session.validate(sources), limits.stage(len(sources)), "validating the headers",
                       session.activity)
    if len(valid) < len(sources):
        get_run_logger().warning("%d of %d files are not usable audio (see the failed-files artifact).",
                                 len(sources) - len(valid), len(sources))
    return valid


@task(name="preprocess-files", cache_policy=NO_CACHE)
def preprocess_files(session: ExtractionSession, sources: list[AudioSource]) -> list[TrackJob]:
    """Decode, downmix, resample and window a chunk of files (CPU work, outside the GPU slot)."""
    return list(session.preprocess(sources))


@task(name="extract-embeddings", cache_policy=NO_CACHE)
def extract_embeddings(session: ExtractionSession, jobs: list[TrackJob], slot: GpuSlot) -> list[FileOutcome]:
    """Run a chunk's windows through the model inside the run's GPU slot, and write the features."""
    logger = get_run_logger()
    # On an error, extract gives every job back itself: what was not written keeps its row pending (redone next run).
    outcomes = session.extract(jobs, slot=slot)
    done = sum(o.status == "done" for o in outcomes)
    audio = sum(o.duration_seconds or 0.0 for o in outcomes if o.status == "done")
    logger.info("Extracted %d of %d files (%.1f min of audio).", done, len(outcomes), audio / 60)
    return outcomes


@task(name="process-chunk", cache_policy=NO_CACHE, retries=3, retry_delay_seconds=10,
      retry_jitter_factor=0.5, retry_condition_fn=is_transient)
def process_chunk(session: ExtractionSession, sources: list[AudioSource], slot: GpuSlot,
                  index: int, total: int, seconds: float | None = None) -> list[FileOutcome]:
    """One chunk of files: preprocess, then extract, within ``seconds`` (none: no limit). A retry redoes only the
    files not settled yet. A chunk past its limit raises ``StageTimeout`` naming what it was stuck on (not
    retried: the stuck work still holds its files)."""
    logger = get_run_logger()

    def work() -> list[FileOutcome]:
        pending = session.still_pending(sources)
        logger.info("Chunk %d of %d: %d files to extract.", index + 1, total, len(pending))
        if not pending:
            return []
        jobs = preprocess_files(session, pending)
        outcomes = extract_embeddings(session, jobs, slot) if jobs else []
        ids = {s.track_id for s in pending}
        transient = [o for o in session.outcomes.values()
                     if o.track_id in ids and o.status == "failed" and not o.permanent]
        if transient:
            raise TransientFileErrors(transient)
        return outcomes

    return work() if seconds is None else run_within(work, seconds, f"chunk {index + 1} of {total}",
                                                     session.activity)


@task(name="check-integrity", cache_policy=NO_CACHE)
def check_integrity(session: ExtractionSession, limits: TimeLimits = TimeLimits()) -> list[str]:
    """Structural check of the tracks this run extracted or failed: their files with the right shapes, nothing
    stray (``mess-ai check`` checks every track)."""
    report = run_within(session.check, limits.stage(session.discovered), "checking the store", session.activity)
    logger = get_run_logger()
    (logger.info if report.ok else logger.error)(report.describe())
    return report.lines()
