"""Decoding ahead of the model: the files of a chunk decoded in the background, by decoding processes or by one
thread, and handed to the model in the order they finish, while the audio in flight stays under a budget.

Audio in flight is what has been handed to a decoding process (or, decoded by the stream's own thread, what it
has decoded) and not yet taken by the model, in seconds of audio (the headers' durations): about 5.8 MB a minute
at 24 kHz. A stream starts another file while the session's audio in flight is under ``AudioBudget.seconds``, and
always when it has none of its own in flight, so a stream waiting for the model (another chunk holds it) never
keeps the one that holds it from going on.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from typing import ContextManager, Protocol

from mess_ai.audio import AudioSource, OpenedAudio
from mess_ai.deadline import Activity
from mess_ai.extraction.track import TrackAttempt
from mess_ai.features.extractor import TrackJob

log = logging.getLogger(__name__)

# Audio in flight per decoding process (10 minutes: ~58 MB decoded), so that each has a few 3-minute files to go
# on with while the model takes what is decoded; decoding in a thread counts as one.
BUDGET_SECONDS_PER_WORKER = 600.0
# How long closing a stream waits for its thread, which may be stuck in a read that never returns (a dead network
# mount): then it is left, holding its file, as a stage past its time limit leaves its thread.
_CLOSE_SECONDS = 10.0
# How often a wait for the next job looks again at what the stream's thread is doing.
_LOOK_AGAIN_SECONDS = 0.5
_END = object()
_WAKE = object()


def budget_seconds(workers: int) -> float:
    """The session's budget of audio in flight for ``workers`` decoding processes (0: decoding in a thread)."""
    return BUDGET_SECONDS_PER_WORKER * max(1, workers)


class AudioBudget:
    """Seconds of audio in flight in a session, shared by its streams; a release wakes the streams that wait."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.in_flight = 0.0
        self._lock = threading.Lock()
        self._waiting: list[queue.SimpleQueue] = []

    def allows(self, own: float) -> bool:
        """Whether a stream with ``own`` seconds in flight may start another file."""
        with self._lock:
            return own == 0 or self.in_flight < self.seconds

    def take(self, seconds: float) -> None:
        with self._lock:
            self.in_flight += seconds

    def give(self, seconds: float) -> None:
        with self._lock:
            self.in_flight -= seconds
            waiting = list(self._waiting)
        for events in waiting:
            events.put(_WAKE)

    def watch(self, events: queue.SimpleQueue) -> None:
        with self._lock:
            self._waiting.append(events)

    def unwatch(self, events: queue.SimpleQueue) -> None:
        with self._lock:
            if events in self._waiting:
                self._waiting.remove(events)


class LentSlot:
    """The model's slot (``slot()``, a context manager: the GPU slot) for a stream's model work, given up while the
    stream waits for its next decoded file: another chunk whose files are decoded uses the model meanwhile, and a
    file stuck in decoding never keeps the model from the other chunk."""

    def __init__(self, slot: Callable[[], ContextManager]) -> None:
        self._slot = slot
        self._held: ContextManager | None = None

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        self._take()
        try:
            yield
        finally:
            self._give()

    @contextlib.contextmanager
    def given_up(self) -> Iterator[None]:
        """Without the slot for the block (when it was held), and with it again after, unless the block raised: a
        stream that ended or failed while it waited takes no slot again (after a time-out, its run may have given
        the slot back already)."""
        if self._held is None:
            yield
            return
        self._give()
        yield
        self._take()

    def _take(self) -> None:
        held = self._slot()
        held.__enter__()
        self._held = held

    def _give(self) -> None:
        held, self._held = self._held, None
        if held is not None:
            held.__exit__(None, None, None)


@dataclass
class OpenTrack:
    """A track taken by this run, its attempt begun (the file hashed), its file still open: ``files`` closes it."""

    track: TrackAttempt
    opened: OpenedAudio
    files: contextlib.ExitStack

    def give_back(self) -> None:
        self.files.close()
        self.track.give_back()


class DecodeSteps(Protocol):
    """The session's steps on one file, as a stream runs them (``ExtractionSession``)."""

    activity: Activity

    def preprocess(self, sources: list[AudioSource]) -> Iterator[TrackJob]:
        """The jobs of ``sources``, each decoded in the calling thread as it is asked for."""

    def open_track(self, source: AudioSource) -> OpenTrack | None:
        """Take, check, open and hash the file; None when it needs no decoding (busy, settled, failed: recorded)."""

    def submit(self, track: OpenTrack) -> Future:
        """Hand it to a decoding process."""

    def decoded_by_worker(self, track: OpenTrack, outcome: Future) -> TrackJob | None:
        """The job from a decoding process's ``outcome`` (of ``submit``); None when it failed (recorded)."""


class DecodeAhead(Iterator[TrackJob]):
    """The jobs of ``sources``, decoded in the background from the moment it is made, in the order they finish.

    With ``in_workers``, this stream's thread opens and hashes each file (``open_track``) and hands it to the
    decoding processes (``submit``); without, it decodes them itself, one after the other. Either way a file is
    started only while ``budget`` allows. ``close`` (also by the model stage when it stops) ends the thread and gives back every track
    not taken; jobs taken are the taker's to end.
    """

    def __init__(self, steps: DecodeSteps, sources: list[AudioSource], durations: dict[str, float],
                 budget: AudioBudget, in_workers: bool = False) -> None:
        self._steps, self._sources, self._durations = steps, list(sources), durations
        self._budget, self._in_workers = budget, in_workers
        self._out: queue.SimpleQueue = queue.SimpleQueue()
        self._events: queue.SimpleQueue = queue.SimpleQueue()
        self._own = 0.0  # seconds of this stream's audio in flight
        self._guard = threading.Lock()
        self._stopped = False
        self._lent: LentSlot | None = None
        budget.watch(self._events)
        self._thread = threading.Thread(target=self._produce, name="mess-ai-decode-ahead", daemon=True)
        self._thread.start()

    # --- the model's side -------------------------------------------------------------------------------------
    def lend(self, slot: Callable[[], ContextManager]) -> LentSlot:
        """``slot`` as the model stage should take it for this stream: given up while this stream waits."""
        self._lent = LentSlot(slot)
        return self._lent

    def __next__(self) -> TrackJob:
        if self._lent is not None and self._out.empty():
            with self._lent.given_up():
                return self._next()
        return self._next()

    def _next(self) -> TrackJob:
        activity = self._steps.activity
        before = activity.of(threading.get_ident())
        while True:
            # A stage that runs past its limit while waiting here names what the stream's thread is stuck on
            # (reading or decoding a file), not the model.
            doing, track_id, stage = activity.of(self._thread.ident)
            activity.set(doing or "waiting for the first file to be decoded", track_id, stage)
            try:
                item = self._out.get(timeout=_LOOK_AGAIN_SECONDS)
                break
            except queue.Empty:
                continue
        if before[0] is None:
            activity.clear()
        else:
            activity.set(*before)
        if item is _END:
            self._out.put(_END)  # every later call stops too
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        job, seconds = item
        self._release(seconds)
        return job

    def close(self) -> None:
        """Stop decoding and give back every track not taken; waits up to ``_CLOSE_SECONDS`` for the thread."""
        with self._guard:
            self._stopped = True
        self._events.put(_WAKE)
        self._thread.join(_CLOSE_SECONDS)
        self._drain()
        self._budget.unwatch(self._events)
        self._out.put(_END)

    def _drain(self) -> None:
        while True:
            try:
                item = self._out.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, tuple):
                job, seconds = item
                job.context.give_back()
                self._release(seconds)

    # --- the stream's thread ----------------------------------------------------------------------------------
    def _produce(self) -> None:
        try:
            if self._in_workers:
                self._decode_in_workers()
            else:
                self._decode_here()
        except BaseException as exc:  # noqa: BLE001 - handed to the model's side
            self._emit(exc)
        finally:
            self._emit(_END)

    def _decode_here(self) -> None:
        jobs = self._steps.preprocess(self._sources)
        try:
            while self._wait_for_budget():
                job = next(jobs, None)
                if job is None:
                    return
                seconds = self._reserve(job.track_id)
                if not self._emit((job, seconds)):
                    job.context.give_back()
                    self._release(seconds)
        finally:
            jobs.close()

    def _decode_in_workers(self) -> None:
        pending: dict[Future, tuple[OpenTrack, float, AudioSource]] = {}
        sources = list(reversed(self._sources))
        try:
            while not self.stopped:
                while sources and self._budget.allows(self._own) and not self.stopped:
                    source = sources.pop()
                    seconds = self._reserve(source.track_id)
                    track = self._steps.open_track(source)
                    if track is None:
                        self._release(seconds)
                        continue
                    future = self._steps.submit(track)
                    pending[future] = (track, seconds, source)
                    future.add_done_callback(self._events.put)
                if not pending and not sources:
                    return
                if pending:
                    _, _, oldest = next(iter(pending.values()))
                    self._steps.activity.set(f"decoding {oldest.relative} (in a decoding process)",
                                             oldest.track_id, "preprocess")
                event = self._events.get()
                if event is _WAKE or self.stopped:
                    continue
                track, seconds, _ = pending.pop(event)
                job = self._steps.decoded_by_worker(track, event)
                if job is None:
                    self._release(seconds)
                elif not self._emit((job, seconds)):
                    job.context.give_back()
                    self._release(seconds)
        finally:
            for future, (track, seconds, _) in pending.items():
                future.cancel()
                track.give_back()
                self._release(seconds)

    # --- bookkeeping ------------------------------------------------------------------------------------------
    @property
    def stopped(self) -> bool:
        with self._guard:
            return self._stopped

    def _wait_for_budget(self) -> bool:
        """Wait until the budget lets this stream start a file; False when the stream is closed meanwhile."""
        while not self.stopped:
            if self._budget.allows(self._own):
                return True
            self._events.get()
        return False

    def _reserve(self, track_id: str) -> float:
        seconds = self._durations.get(track_id, 0.0)
        with self._guard:
            self._own += seconds
        self._budget.take(seconds)
        return seconds

    def _release(self, seconds: float) -> None:
        with self._guard:
            self._own -= seconds
        self._budget.give(seconds)

    def _emit(self, item: object) -> bool:
        """Hand ``item`` to the model's side; False when the stream was closed (a job is then the caller's)."""
        with self._guard:
            if self._stopped and isinstance(item, tuple):
                return False
            self._out.put(item)
            return True
