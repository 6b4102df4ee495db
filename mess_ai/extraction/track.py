"""One attempt on one track, from taking its lock to giving it back: the only code that releases a track's lock and
writes an attempt's record in the manifest.

An attempt begins (``begin_attempt``: the row goes pending, its ``unfinished`` count up by one) and ends in one of
three ways: done (``mark_done``), failed (``mark_failed``), or given back without an outcome by a run that stops in
order (``end_attempt``: the row stays pending and is redone next run). A process that dies during an attempt ends
it in none of them: its ``unfinished`` count stays, and after ``UNFINISHED_BEFORE_GIVING_UP`` such deaths on the
same bytes the file is given up on (one file cannot kill every night).
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any, Sequence

import numpy as np

from mess_ai.audio import AudioSource
from mess_ai.audio.decode_pool import DecodingProcessDied
from mess_ai.audio.loading import DECODER_REVISION
from mess_ai.audio.opening import OpenedAudio, sha256_fd
from mess_ai.deadline import StageTimeout
from mess_ai.errors import InputError, TrackBusyError
from mess_ai.extraction.plan import file_identity, known_sha256
from mess_ai.extraction.stats import FileOutcome
from mess_ai.store import PENDING, FeatureStore
from mess_ai.store.lock import ClaimedTrackLock
from mess_ai.store.manifest import Done, unfinished_before

log = logging.getLogger(__name__)

# Attempts that ended in a time-out before a file counts as failed for good (until its bytes change).
TIMEOUTS_BEFORE_GIVING_UP = 3
# Attempts during which the process died (killed by the kernel for memory, a crash in a decoder) before a file
# counts as failed for good (until its bytes change): one file cannot kill every night.
UNFINISHED_BEFORE_GIVING_UP = 3


# ``TrackAttempt.begin`` without a row from its caller: it reads the row itself.
_UNREAD: Any = object()


class _Unfinished(Exception):
    """Thrown into what an attempt left open, so that it is discarded rather than completed."""


class TrackAttempt:
    """A track held by this run: its ``ClaimedTrackLock`` (a file lock and a claim in the manifest), its attempt
    record, and the files it has open (an unfinished raw file). Used in a ``with`` block, right after ``take``.

    ``done`` and ``failed`` record the attempt's outcome and give the track back at once. A block left without an
    outcome, by an exception or not, gives it back in order (``give_back``), unless the track was handed over
    (``hand_over``) to the job that carries it to the model: then the job's holder ends it, with ``done``,
    ``failed`` or ``give_back``. Whatever ends it, the lock is released once, even when the manifest cannot be
    written (the run stops; the lock must not stay); an unfinished raw file is discarded, so a failed attempt
    never replaces features of an earlier extraction.
    """

    def __init__(self, store: FeatureStore, source: AudioSource, key: str, lock: ClaimedTrackLock) -> None:
        self.store, self.source, self.key, self.lock = store, source, key, lock
        self.attempts = 0
        self.started = time.perf_counter()
        self.stat: Any = None  # the file's os.stat_result when it was hashed
        self.died_before = 0  # attempts on the same bytes a process died in (see ``begin``)
        self.duration_seconds = 0.0
        self.n_samples = 0  # of the decoded signal at the model's rate
        self._files = contextlib.ExitStack()
        self._raw: np.memmap | None = None
        self._begun = self._settled = self._handed_over = self._released = False

    @classmethod
    def take(cls, store: FeatureStore, source: AudioSource, key: str, wait: bool = True) -> "TrackAttempt | None":
        """The track, locked for this run; without ``wait``, None when another run holds it right now."""
        lock = store.lock(source.track_id)
        try:
            lock.acquire(blocking=wait)
        except TrackBusyError:
            return None
        return cls(store, source, key, lock)

    def __enter__(self) -> "TrackAttempt":
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        if exc_type is not None or not self._handed_over:
            self.give_back()

    def hand_over(self) -> "TrackAttempt":
        """Keep the track held past its ``with`` block: whoever holds the job it travels with ends it."""
        self._handed_over = True
        return self

    def begin(self, opened: OpenedAudio | None = None, error: BaseException | None = None,
              row: Any = _UNREAD) -> BaseException | None:
        """Record an attempt, with the hash of the bytes ``opened`` holds (the file opened once, the safe way, by the
        caller; ``error`` when that failed). Returns what stops the attempt before it starts: that error, a hash
        that cannot be read, or a poison file (the process died during its last ``UNFINISHED_BEFORE_GIVING_UP``
        attempts on these bytes). ``row``: the track's manifest row (or None: none), when the caller has read it
        since the track was taken (with at least ``PLAN_COLUMNS``); else it is read here."""
        manifest, dataset, source = self.store.manifest, self.store.dataset, self.source
        if row is _UNREAD:
            row = manifest.get(dataset, source.track_id)
        stat, sha = None, None
        if opened is not None and error is None:
            try:
                stat = opened.stat  # before hashing: a change during the hash shows after decoding
                sha = known_sha256(row, stat) or sha256_fd(opened.fd)
            except OSError as exc:
                stat, sha, error = None, None, exc
        died = unfinished_before(row, sha, self.key)
        self.attempts = manifest.begin_attempt(
            dataset, source.track_id, source_path=str(source.path), relative_path=source.relative,
            size=stat.st_size if stat else None, mtime_ns=stat.st_mtime_ns if stat else None, sha256=sha,
            config_key=self.key, file_identity=file_identity(stat) if stat else None)
        # Temporary files a killed run left of this track are not looked for here: finding them lists the scale
        # folders, as long as the dataset; the run sweeps them at its start and, for its own tracks, at its end.
        self._begun, self.started, self.stat, self.died_before = True, time.perf_counter(), stat, died
        if error is None and died >= UNFINISHED_BEFORE_GIVING_UP:
            error = InputError(source.path, f"the process ended {died} times while extracting this file (killed, "
                                            "e.g. for memory, or crashed: the run's own or its decoding process): "
                                            "given up on, not retried until the file changes", "preprocess")
        return error

    def content_changed(self, stat: Any, sha256: str) -> None:
        """The file changed while it was read: the attempt now describes its new bytes (attempts unchanged)."""
        self.stat = stat
        self.store.manifest.update_content(self.store.dataset, self.source.track_id, size=stat.st_size,
                                           mtime_ns=stat.st_mtime_ns, sha256=sha256, file_identity=file_identity(stat))

    def write_raw_window(self, index: int, window: np.ndarray, n_windows: int) -> None:
        """Window ``index`` of the raw scale, float16 [n_states, frames, hidden], into the track's raw file (a
        temporary one, put in place by ``complete_files``)."""
        if self._raw is None:
            self._raw = self._files.enter_context(
                self.store.raw_writer(self.source.track_id, (n_windows, *window.shape)))
        self._raw[index] = window

    def complete_files(self) -> None:
        """Put the files written during the attempt (the raw file) in place."""
        self._files.close()

    def done(self, n_windows: int) -> FileOutcome:
        """Record the attempt as done and give the track back."""
        return settle_done([(self, n_windows)])[0]

    def failed(self, stage: str, exc: BaseException) -> FileOutcome:
        """Record the attempt as failed at ``stage`` because of ``exc`` (permanent for an ``InputError``: bad
        input fails the same way every time) and give the track back. The track's features of an earlier
        extraction, if any, stay: only new complete ones replace them. A decoding process that died counts as a
        process dying in the attempt: after ``UNFINISHED_BEFORE_GIVING_UP`` such on the same bytes, ``begin``
        gives up on the file."""
        permanent = isinstance(exc, InputError)
        reason = exc.reason if isinstance(exc, InputError) else (str(exc) or type(exc).__name__)
        seconds = time.perf_counter() - self.started
        try:
            self._discard_unfinished()
            self._settled = True
            self.store.manifest.mark_failed(self.store.dataset, self.source.track_id, stage=stage,
                                            error_class=type(exc).__name__, message=reason, permanent=permanent,
                                            seconds_spent=seconds, duration_seconds=self.duration_seconds or None,
                                            unfinished=self.died_before + 1 if isinstance(exc, DecodingProcessDied)
                                            else 0)
        finally:
            self.give_back()
        log.warning("%s failed at %s: %s (attempt %d%s)", self.source.relative, stage, reason, self.attempts,
                    "" if permanent else ", will be retried")
        return FileOutcome(self.source.track_id, self.source.relative, "failed", stage, type(exc).__name__, reason,
                           self.attempts, self.duration_seconds or None, seconds, permanent)

    def give_back(self) -> None:
        """Give the track back to other runs; once, whatever fails on the way. An attempt given back without an
        outcome (the run stopped in order, or the job will not be extracted) is ended: its row stays pending, and
        it does not count as one the process died in."""
        if self._released:
            return
        self._released = True
        try:
            self._discard_unfinished()
            if self._begun and not self._settled:
                self.store.manifest.end_attempt(self.store.dataset, self.source.track_id)
        finally:
            self.lock.release()

    def _discard_unfinished(self) -> None:
        """Close what the attempt left open without completing it: an unfinished raw file's temporary is removed."""
        self._files.__exit__(_Unfinished, _Unfinished(), None)


def settle_done(finished: Sequence[tuple[TrackAttempt, int]]) -> list[FileOutcome]:
    """Record the attempts of ``finished`` ((track, its window count): tracks whose features are written, of one
    store) as done, then give each track back. One manifest transaction marks them all done and deletes their
    claims, so the tracks one model batch finishes cost one write, not two per track. When it fails (the
    manifest cannot be written), every track is still given back: its lock released, its row left pending."""
    if not finished:
        return []
    store = finished[0][0].store
    if any(track.store is not store for track, _ in finished):
        raise ValueError("tracks settled together must be of one store")
    now = time.perf_counter()
    done = [Done(track.source.track_id, track.duration_seconds, n_windows, now - track.started, track.n_samples,
                 DECODER_REVISION) for track, n_windows in finished]
    try:
        for track, _ in finished:
            track._settled = True
        store.manifest.mark_done_many(store.dataset, done, release_claims=[
            (track.source.track_id, track.lock.owner) for track, _ in finished if track.lock.claimed])
        for track, _ in finished:
            track.lock.claim_released()
    finally:
        for track, _ in finished:
            track.give_back()
    return [FileOutcome(track.source.track_id, track.source.relative, "done", attempts=track.attempts,
                        duration_seconds=track.duration_seconds, seconds=record.seconds_spent)
            for (track, _), record in zip(finished, done)]


def fail_stuck(store: FeatureStore, source: AudioSource, key: str, timeout: StageTimeout) -> FileOutcome:
    """Record ``source``, the file a stage was stuck on, as failed with the time-out as the reason.

    Its thread is still stuck and holds the track, so the lock is left alone: the run stops and its process ends,
    and the next run takes over the lock of a dead process. Retried on the next runs, like any I/O trouble; a file
    whose decoding hung ``TIMEOUTS_BEFORE_GIVING_UP`` times (same bytes) is a permanent failure until it changes,
    so one file cannot stop every night.
    """
    stage = timeout.stage or "preprocess"
    row = store.manifest.get(store.dataset, source.track_id)
    if row is not None and row["status"] == PENDING and row["config_key"] == key:
        attempts = row["attempts"]  # its attempt was recorded (with its bytes' hash) before it got stuck
    else:  # stuck before that, e.g. reading the bytes to hash them: an attempt of unknown bytes
        attempts = store.manifest.begin_attempt(
            store.dataset, source.track_id, source_path=str(source.path), relative_path=source.relative,
            size=None, mtime_ns=None, sha256=None, config_key=key)
    permanent = attempts >= TIMEOUTS_BEFORE_GIVING_UP
    reason = (f"timed out: {timeout.what} was stuck {timeout.doing} for {timeout.seconds:.0f} s (attempt "
              f"{attempts}; " + ("not retried until the file changes)" if permanent else "retried next run)"))
    store.manifest.mark_failed(store.dataset, source.track_id, stage=stage, error_class="StageTimeout",
                               message=reason, permanent=permanent, seconds_spent=timeout.seconds,
                               duration_seconds=None)
    log.warning("%s failed at %s: %s", source.relative, stage, reason)
    return FileOutcome(source.track_id, source.relative, "failed", stage, "StageTimeout", reason, attempts,
                       permanent=permanent)
