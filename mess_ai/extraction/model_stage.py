"""The model's side of extraction: one model worker per device (each GPU of the host, or the one device asked for),
each with its own copy of the model and its own extractor, loaded on first use only (the dataset's provenance written
with the first), and prepared tracks run through a free worker inside a slot; the tracks each batch finishes are
written, checked and recorded done together, behind the model (``WriteBehind``)."""

from __future__ import annotations

import collections
import contextlib
import contextvars
import dataclasses
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Iterable, Iterator

from mess_ai.config import ExtractConfig
from mess_ai.deadline import Activity
from mess_ai.extraction.decoding import DecodeAhead
from mess_ai.extraction.provenance import build_provenance
from mess_ai.extraction.stats import FileOutcome, RunStats
from mess_ai.extraction.steps import check_written, extractor_for, load_model, write_features
from mess_ai.extraction.track import TrackAttempt, settle_done
from mess_ai.features.device import host_lock_name, host_model_devices, torch_device
from mess_ai.features.device_locks import hold_device
from mess_ai.features.extractor import Extractor, TrackJob
from mess_ai.features.loaded import LoadedModel
from mess_ai.store import FeatureStore

# How often a wait on the writer looks again (for its error, and to say what it is doing).
_LOOK_AGAIN_SECONDS = 0.5


@dataclass(frozen=True)
class ModelWorker:
    """The model work of one device: its name (``cuda:1``, ``cpu``), its copy of the model and its extractor."""

    device: str
    model: LoadedModel
    extractor: Extractor


class ModelStage:
    """Extract and write, for one dataset of ``store`` and one config (content ``key``, ``precision`` and model
    ``identity`` resolved by the session); outcomes and timings go to ``stats``. Thread-safe: chunks of the flows
    share it, each chunk's model work on one free device of ``devices`` (default: every GPU of the host for
    ``cuda`` and ``auto``, see ``mess_ai.features.device.model_devices``), and each device's model is loaded once."""

    def __init__(self, config: ExtractConfig, store: FeatureStore, key: str, precision: str,
                 identity: dict[str, Any], loader: Callable[..., LoadedModel], stats: RunStats,
                 activity: Activity) -> None:
        self.config, self.store, self.key, self.precision, self.identity = config, store, key, precision, identity
        self.loader, self.stats, self.activity = loader, stats, activity
        self.devices = host_model_devices(config.device)
        self._workers: dict[str, ModelWorker] = {}
        self._loading: dict[str, threading.Lock] = {}
        self._host_locks: dict[str, str | None] | None = None
        self._works_on: collections.Counter[str] = collections.Counter()  # works of this process on each device
        self._works_begun: collections.Counter[str] = collections.Counter()  # and all it has begun on each
        self._lock = threading.Lock()

    @property
    def loaded(self) -> bool:
        return bool(self._workers)

    def model(self) -> LoadedModel:
        """The first device's model, loaded on first use only (a run with nothing new never loads it), before any
        other device's: the one the checks before model work and the decoding (its sampling rate) go by."""
        return self._worker(self.devices[0]).model

    def _worker(self, device: str) -> ModelWorker:
        """``device``'s worker, its model loaded on first use. Each device loads under a lock of its own, so the
        chunks working on loaded devices never wait for another device's model to load."""
        with self._lock:
            loading = self._loading.setdefault(device, threading.Lock())
        with loading:
            worker = self._workers.get(device)
            if worker is None:
                # The config as this worker runs it: on its own device.
                config = self.config.model_copy(update={"device": torch_device(device)})
                started = time.perf_counter()
                model = load_model(config, self.identity, self.precision, self.store.dataset, self.loader)
                self.stats.add_model_load(time.perf_counter() - started)
                if device == self.devices[0]:  # the first model loaded (see ``model``)
                    provenance = build_provenance(self.config, model, self.key, self.precision, self.identity)
                    if self.store.read_provenance() != provenance:
                        self.store.write_provenance(provenance)
                worker = ModelWorker(device, model, extractor_for(model, self.config, self.precision))
                self._workers[device] = worker
            return worker

    def _device_locks(self) -> dict[str, str | None]:
        """Each device's host-wide lock (looked up once: a GPU's UUID asks CUDA)."""
        with self._lock:
            if self._host_locks is None:
                self._host_locks = {device: host_lock_name(device) for device in self.devices}
            return self._host_locks

    def extract(self, jobs: Iterable[TrackJob], slot: Callable[[], ContextManager] = contextlib.nullcontext
                ) -> list[FileOutcome]:
        """Run prepared tracks through the model on one free device and write them; model work happens inside
        ``slot()`` and the device's host-wide lock.

        Whatever stops it (the manifest cannot be written, a closed generator), every track it was handed is
        given back: those in hand and those prepared ahead keep their rows pending, and the next run redoes them.
        """
        outcomes: list[FileOutcome] = []
        taken: list[TrackJob] = []
        listed = list(jobs) if isinstance(jobs, (list, tuple)) else []
        chosen: dict[str, str] = {}  # the device of this work's first turn

        def take() -> Iterator[TrackJob]:
            for job in jobs:
                taken.append(job)
                self.activity.set(_model_work_words([j for j in listed or taken if not j.complete],
                                                    chosen.get("device") if len(self.devices) > 1 else None))
                yield job

        def turn() -> ContextManager:
            return self._turn(slot, chosen)

        try:
            self.model()
            self.activity.set("waiting for the model (one of the run's GPU slots, then a free device)")
            # Jobs decoded ahead give the turn up while they wait for the next decoded file (see ``LentSlot``).
            with (jobs.lend(turn) if isinstance(jobs, DecodeAhead) else turn)():
                device = chosen["device"]
                words = _model_work_words(listed, device if len(self.devices) > 1 else None)
                outcomes = self._run(take(), self._worker(device), words)
        finally:
            if chosen:
                with self._lock:
                    self._works_on[chosen["device"]] -= 1
            if hasattr(jobs, "close"):
                jobs.close()
            for job in [*taken, *listed]:
                job.context.give_back()
        self.stats.add("extract", files=len(outcomes), audio_seconds=sum(o.duration_seconds or 0.0 for o in outcomes))
        return outcomes

    @contextlib.contextmanager
    def _turn(self, slot: Callable[[], ContextManager], chosen: dict[str, str]) -> Iterator[None]:
        """A turn at the model, recorded as an interval of model work: the run's ``slot``, then a free device under
        its host-wide lock. Every later turn of the same work takes the device of its first (``chosen``): its
        extractor holds the batch in progress. A first turn tries the devices no other work of this process is on
        first, so that works waiting for decoding (their turn given up) keep their devices to themselves, and of
        those the one it has begun the fewest works on, so that works are spread over the devices even when one
        ends before the next begins."""
        locks = self._device_locks()
        with slot():
            if chosen:
                wanted = {chosen["device"]: locks[chosen["device"]]}
            else:
                with self._lock:
                    order = sorted(locks, key=lambda device: (self._works_on[device], self._works_begun[device]))
                wanted = {device: locks[device] for device in order}
            with hold_device(wanted) as device:
                if not chosen:
                    chosen["device"] = device
                    with self._lock:
                        self._works_on[device] += 1
                        self._works_begun[device] += 1
                extractor = self._worker(device).extractor
                started, batches, seconds = time.time(), extractor.stats.batches, extractor.stats.model_seconds
                try:
                    yield
                finally:
                    # Counted per turn: works of two chunks take turns on one device's extractor.
                    self.stats.add("extract", extractor.stats.model_seconds - seconds)
                    if extractor.stats.batches != batches:  # a turn given up before any batch held no model work
                        self.stats.add_model_work(started, time.time(), device)

    # Whether the tracks a batch finishes are written by a thread of their own while the model runs the next
    # batches (see ``WriteBehind``); the settle benchmark turns it off to compare.
    write_behind = True

    def _run(self, jobs: Iterator[TrackJob], worker: ModelWorker, doing: str) -> list[FileOutcome]:
        """The model's work on ``jobs`` on ``worker``'s device, the tracks each batch completes written together
        as soon as it completes: behind the model, by a thread of their own (``write_behind``), or here."""
        extractor = worker.extractor
        try:
            with self.stats.watch("extract"):
                on_raw = _write_raw_window if self.config.keep_raw else None
                self.activity.set(doing)
                if not self.write_behind:
                    outcomes = []
                    for finished in extractor.run_batches(jobs, on_raw=on_raw):
                        outcomes += self._finish(finished, worker.device)
                        self.activity.set(doing)
                    return outcomes
                with WriteBehind(lambda finished: self._finish(finished, worker.device), self.activity) as behind:
                    for finished in extractor.run_batches(jobs, on_raw=on_raw):
                        behind.put(finished)
                        self.activity.set(doing)
                return behind.outcomes
        finally:
            self.stats.add_first_window(extractor.stats.first_batch_at)

    def _finish(self, jobs: list[TrackJob], device: str) -> list[FileOutcome]:
        """Write the features of tracks the model finished together on ``device``, check them, and record their
        outcomes: each track's files, then one sync of the feature folders and one manifest write for all of
        them (``settle_done``). A track that fails is recorded on its own; the others are not held back."""
        outcomes: list[FileOutcome] = []
        written: list[TrackJob] = []

        def record(outcome: FileOutcome) -> None:
            outcomes.append(self.stats.record(dataclasses.replace(outcome, device=device)))

        for job in jobs:
            track: TrackAttempt = job.context
            if job.error is not None:
                record(track.failed("extract", job.error))
                continue
            try:
                self.activity.set(f"writing the features of {track.source.relative}", job.track_id, "write")
                with self.stats.stage("write", files=1, audio_seconds=track.duration_seconds):
                    write_features(self.store, job, sync_dirs=False)
                with self.stats.stage("integrity", files=1, audio_seconds=track.duration_seconds):
                    check_written(self.store, job, self.config.keep_raw)
            except Exception as exc:  # noqa: BLE001 - e.g. disk full: recorded, retried
                record(track.failed("write", exc))
                continue
            written.append(job)
        if written:
            self.activity.set(f"recording {len(written)} tracks as done", written[0].track_id, "write")
            with self.stats.stage("write"):
                self.store.sync_feature_dirs()  # the renames durable before the manifest says done
            for outcome in settle_done([(job.context, job.n_windows) for job in written]):
                record(outcome)
        return outcomes


class WriteBehind:
    """Writes the tracks the model finishes (``finish``: their files, checks and manifest records) in a thread of its
    own, so the model's next batches run meanwhile: on a GPU a batch of short files takes about as long as writing
    them (docs/benchmarks.md, settle), and written on the model's thread the device would wait for every write.

    At most ``depth`` groups wait to be written: ``put`` waits beyond that (the features held stay bounded; each
    track's decoded audio is let go when it is queued). Leaving the block waits for every write, so the tracks are
    settled (done, failed, or given back by the caller) before the work ends, and a write's error that escapes
    ``finish`` (the manifest cannot be written) is raised from ``put`` or from the block, the groups after it left
    unwritten for the caller to give back. While the model's thread waits for the writer, it says what the writer
    is doing (``activity``), so a time-out names the file a stuck write is on."""

    def __init__(self, finish: Callable[[list[TrackJob]], list[FileOutcome]], activity: Activity,
                 depth: int = 2) -> None:
        self.outcomes: list[FileOutcome] = []
        self._finish, self._activity = finish, activity
        self._queue: queue.Queue[list[TrackJob] | None] = queue.Queue(depth)
        self._error: BaseException | None = None
        # With the caller's context variables, as the model's thread has them (a run's logging context).
        self._thread = threading.Thread(target=contextvars.copy_context().run, args=(self._write,),
                                        name="mess-ai-write-behind", daemon=True)

    def __enter__(self) -> "WriteBehind":
        self._thread.start()
        return self

    def put(self, finished: list[TrackJob]) -> None:
        for job in finished:
            job.signal = job.signal[:0]  # written from its segments: the audio is not needed any more
        self._wait(lambda: self._queue.put(finished, timeout=_LOOK_AGAIN_SECONDS))

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        if self._thread.is_alive():
            self._wait(lambda: self._queue.put(None, timeout=_LOOK_AGAIN_SECONDS), raise_error=False)
            self._wait(lambda: self._joined(), raise_error=False)
        if exc_type is None and self._error is not None:
            raise self._error

    def _joined(self) -> None:
        self._thread.join(_LOOK_AGAIN_SECONDS)
        if self._thread.is_alive():
            raise queue.Full  # not yet: look again

    def _wait(self, attempt: Callable[[], None], raise_error: bool = True) -> None:
        """``attempt`` until it goes through (it raises ``queue.Full`` while it cannot), meanwhile saying what
        the writer is doing; raises the writer's error instead once it has stopped on one."""
        before = self._activity.of(threading.get_ident())
        try:
            while True:
                if self._error is not None and (raise_error or not self._thread.is_alive()):
                    if raise_error:
                        raise self._error
                    return
                try:
                    attempt()
                    return
                except queue.Full:
                    doing, track_id, stage = self._activity.of(self._thread.ident or 0)
                    if doing:
                        self._activity.set(f"waiting for the writes behind the model ({doing})", track_id, stage)
        finally:
            if before[0] is not None:
                self._activity.set(*before)
            else:
                self._activity.clear()

    def _write(self) -> None:
        while True:
            finished = self._queue.get()
            if finished is None:
                return
            if self._error is not None:
                continue  # stopped: left for the caller to give back
            try:
                self.outcomes += self._finish(finished)
            except BaseException as exc:  # noqa: BLE001 - raised on the model's thread
                self._error = exc
            finally:
                self._activity.clear()


def _write_raw_window(job: TrackJob, index: int, window: Any) -> None:
    job.context.write_raw_window(index, window, job.n_windows)


def _model_work_words(jobs: list[TrackJob], device: str | None) -> str:
    """'running the model on a.wav, b.wav, c.wav and 2 more (cuda:1)': what model work is on, for a time-out's
    message; the device when the run has several."""
    names = [job.context.source.relative for job in jobs]
    return "running the model" + (f" on {', '.join(names[:3])}" if names else "") + (
        f" and {len(names) - 3} more" if len(names) > 3 else "") + (f" ({device})" if device else "")
