"""Prefect tasks for extraction: thin wrappers over the stages of ``mess_ai.pipeline.ExtractionSession``.

The session (store, manifest, model) lives in the flow's process and is handed to the tasks as it is: tasks run
in threads of that process, and nothing heavy goes through Prefect's caching or result machinery (NO_CACHE).
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import threading
import time
from typing import Any, Callable, Iterator

import httpx
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.concurrency.sync import concurrency
from prefect.context import SyncClientContext
from prefect.exceptions import MissingContextError, ObjectAlreadyExists, ObjectNotFound

from mess_ai.audio import AudioSource
from mess_ai.deadline import TimeLimits, run_within
from mess_ai.errors import InputError, MessError, TrackBusyError
from mess_ai.features.device import visible_gpus
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


def ensure_concurrency_limit(name: str, slots: int | None, devices: list[str]) -> int:
    """Create the global concurrency limit ``name`` with ``slots`` slots (None: as many as this host has GPUs, at
    least one) unless it exists (then it is left as an operator may have set it in the UI); returns its slots. A
    limit with fewer slots than the run has ``devices`` lets it use only that many at once: the log says so."""
    logger = get_run_logger()
    slots = slots or max(1, visible_gpus())
    with get_client(sync_client=True) as client:
        try:
            existing = client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            try:
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=slots))
                logger.info("Created the concurrency limit '%s' with %d slot(s) for model work.", name, slots)
            except ObjectAlreadyExists:
                pass  # another run created it at the same moment
            return slots
    if existing.limit < len(devices):
        logger.warning("Concurrency limit '%s' has %d slot(s): this run does model work on at most %d of its %d "
                       "devices (%s) at a time. To use them all, raise its slots in the UI (Concurrency).", name,
                       existing.limit, existing.limit, len(devices), ", ".join(devices))
    elif existing.limit != slots:
        logger.info("Concurrency limit '%s' exists with %d slot(s); keeping it (asked for %d).", name,
                    existing.limit, slots)
    return existing.limit


GPU_LEASE_SECONDS = 60
# How long a run waits for the API to come back to take its GPU slot (a server restart takes ~10 s).
SLOT_RETRY_SECONDS = 300.0
# A slot not granted within this long is asked for again, unless the run gave its slots back meanwhile: a request
# of a run that has ended does not wait in the API's queue for long.
SLOT_WAIT_SECONDS = 10.0


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


class _SlotHolder(threading.Thread):
    """Holds one slot of the Prefect concurrency limit ``limit`` from its start until ``stop``.

    Prefect's ``concurrency`` context has to be left by the thread that entered it (it watches that thread, to
    cancel it when the lease cannot be renewed), while a run's chunks run in Prefect's worker threads: so the slot
    has a thread of its own. It runs in the flow's context (Prefect's settings and run live in context variables).
    ``on_change`` is called with the holder whenever the slot is taken or the hold ends.
    """

    def __init__(self, limit: str, context: contextvars.Context,
                 on_change: Callable[["_SlotHolder"], None]) -> None:
        super().__init__(name=f"mess-ai-gpu-slot-{limit}", daemon=True)
        self.limit = limit
        self.context = context
        self.on_change = on_change
        self.held = False
        self.was_held = False
        self.settled = threading.Event()  # the slot is held, or will not be (error)
        self.error: BaseException | None = None
        self.failed_attempts = 0
        self._released = threading.Event()

    @property
    def gave_up(self) -> bool:
        """Never held its slot, and stopped trying (``error`` says why)."""
        return self.settled.is_set() and not self.was_held and self.error is not None

    @property
    def lost(self) -> bool:
        """Held its slot, and lost it without being stopped (a lease that could not be renewed)."""
        return self.settled.is_set() and self.was_held and not self.held and not self._released.is_set()

    def run(self) -> None:
        self.context.run(self._hold)

    def _hold(self) -> None:
        # Prefect's calls here open clients of their own rather than use the flow run's: a slot granted as the run
        # ends (its client closed) is still renewed and given back.
        SyncClientContext.__var__.set(None)
        delay, waited = 1.0, 0.0
        try:
            while True:
                try:
                    # A short lease: a run killed while holding the slot blocks the others for a minute, not
                    # Prefect's default five; while this thread lives, Prefect renews the lease in the background.
                    with concurrency(self.limit, occupy=1, strict=True, lease_duration=GPU_LEASE_SECONDS,
                                     timeout_seconds=SLOT_WAIT_SECONDS):
                        self.held = self.was_held = True
                        self.settled.set()
                        self.on_change(self)
                        # Woken every second: when the lease cannot be renewed, Prefect cancels this thread with
                        # an exception raised at its next bytecode, which a wait without a timeout never reaches.
                        while not self._released.wait(1.0):
                            pass
                    return
                except BaseException as exc:  # noqa: BLE001 - handed to the chunk that waits for the slot
                    if isinstance(exc, TimeoutError) and not self.held:  # not granted yet: ask again
                        if self._released.is_set():
                            return
                        continue
                    self.failed_attempts += 1
                    if self.held and self._released.is_set():
                        # Said, not swallowed: the next run waits for this slot until its lease ends.
                        _logger().warning("Could not give the '%s' concurrency slot back (%s); the server frees "
                                          "it when its lease ends, within %d s.", self.limit,
                                          str(exc) or type(exc).__name__, GPU_LEASE_SECONDS)
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
            self.on_change(self)

    def stop(self) -> None:
        """Give the slot back; waits for that only when the slot is held (not while still queueing for it)."""
        self._released.set()
        if self.held:
            self.join()


class GpuSlot:
    """The slots of one flow run's model work: ``workers`` slots of a Prefect concurrency limit, one per device
    worker (the run's devices, see ``ExtractionSession.devices``, at most as many as the limit has), each lent to
    one chunk's model work at a time. Which device that chunk's model work runs on, the core decides: a free one,
    under the device's host-wide lock (``mess_ai.features.device_locks``), since Prefect's slots are only counts.

    With a limit ``name``, the run takes its slots of that limit, which other processes and machines share, each on
    a thread of its own, and holds them across its chunks until ``release``: the API grants a slot in milliseconds
    when idle, but while it records the run's task runs on SQLite its write of the slot often fails as busy (503),
    and Prefect's client asks again 2 s later: taken per chunk, that was a third of the flow's own cost per audio
    hour (docs/benchmarks.md, overhead). ``take`` starts taking them in the background,
    so the wait overlaps the first chunks' decoding; a chunk starts its model work on the first slot held and free.
    The slots are taken one after another, each once the one before is held: a run waiting for a busy limit keeps
    one request in the API's queue, not one per device (each waiting request lengthens the API's retry interval for
    every waiter). A killed run stops renewing its leases, so its slots free themselves within
    ``GPU_LEASE_SECONDS``; a lease that cannot be renewed (the API gone) ends that hold, and it is taken again.
    Without a limit, the device locks alone keep model work apart, and so they do for a chunk that outlived its
    run (a stuck one let go after ``release``): it runs without a slot, the run's being given back.
    """

    def __init__(self, name: str | None, workers: int = 1) -> None:
        if workers < 1:
            raise ValueError(f"a run has at least one device worker, got {workers}")
        self.name = name or None
        self.workers = workers
        self._changed = threading.Condition()
        self._context = contextvars.copy_context()
        self._holders: list[_SlotHolder] = []
        self._lent: set[_SlotHolder] = set()  # the slots a chunk's model work is using now
        self._released = False

    def take(self) -> None:
        """Start taking the run's slots, unless they are held or being taken; returns at once."""
        if self.name and not self._released:
            with self._changed:
                self._fill()

    def _fill(self) -> None:
        """Start taking the next slot once every holder holds its own, up to one per worker; holders that lost
        their slot are replaced (called with ``_changed`` held)."""
        for holder in [h for h in self._holders if h.lost]:
            _logger().warning("Lost a '%s' concurrency slot (%s); taking it again.", self.name, holder.error)
            self._holders.remove(holder)
        if len(self._holders) < self.workers and all(h.held for h in self._holders):
            holder = _SlotHolder(self.name, self._context.copy(), self._changed_holder)
            self._holders.append(holder)
            holder.start()

    def _changed_holder(self, holder: _SlotHolder) -> None:
        with self._changed:
            if holder in self._holders:  # not one given back by ``release``
                self._fill()
            self._changed.notify_all()

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        """Model work of one chunk: one of the run's slots, free of other chunks (taken now unless held)."""
        if not self.name or self._released:
            yield
            return
        holder = self._borrow()
        try:
            yield
        finally:
            with self._changed:
                self._lent.discard(holder)
                self._changed.notify_all()

    def _borrow(self) -> _SlotHolder:
        """A slot held and not lent, waiting for one; raises what stopped the taking of a slot when none is held."""
        with self._changed:
            while True:
                self._fill()
                for holder in self._holders:
                    if holder.held and holder not in self._lent:
                        self._lent.add(holder)
                        return holder
                for holder in [h for h in self._holders if h.gave_up]:
                    self._holders.remove(holder)  # the next chunk tries again
                    if not any(h.held for h in self._holders):
                        raise holder.error
                self._changed.wait()

    def release(self, settle_seconds: float = 0.0) -> None:
        """Give the run's slots back (at the end of its chunks). ``settle_seconds``: how long to wait first for a
        slot still being asked for to be granted (then given back at once) or refused: a run that asks for its
        slots as it starts and then finds nothing to do would otherwise leave a request that the API may grant
        after the run's process has ended, and that slot would stay taken until its lease ends (60 s). A request
        waiting for a busy limit holds nothing: the run does not wait for it longer than that."""
        with self._changed:
            holders, self._holders = self._holders, []
            self._released = True
        deadline = time.monotonic() + settle_seconds
        for holder in holders:
            holder.settled.wait(max(0.0, deadline - time.monotonic()))
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


@task(name="process-chunk", cache_policy=NO_CACHE, retries=3, retry_delay_seconds=10,
      retry_jitter_factor=0.5, retry_condition_fn=is_transient)
def process_chunk(session: ExtractionSession, sources: list[AudioSource], slot: GpuSlot,
                  index: int, total: int, seconds: float | None = None) -> list[FileOutcome]:
    """One chunk of files, decoded ahead (outside the GPU slot) and run through the model inside it as each file is
    decoded, within ``seconds`` (none: no limit). A retry redoes only the files not settled yet. A chunk past its
    limit raises ``StageTimeout`` naming what it was stuck on (not retried: the stuck work still holds its files)."""
    logger = get_run_logger()

    def work() -> list[FileOutcome]:
        pending = session.still_pending(sources)
        logger.info("Chunk %d of %d: %d files to extract.", index + 1, total, len(pending))
        if not pending:
            return []
        # Decoding starts now, while another chunk may hold the model; the model takes each file as it is decoded.
        # Whatever stops extract, it closes the stream: tracks not written keep their rows pending (redone next run).
        outcomes = session.extract(session.decode_ahead(pending), slot=slot)
        done = [o for o in outcomes if o.status == "done"]
        logger.info("Chunk %d of %d: extracted %d of %d files (%.1f min of audio).", index + 1, total, len(done),
                    len(pending), sum(o.duration_seconds or 0.0 for o in done) / 60)
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
