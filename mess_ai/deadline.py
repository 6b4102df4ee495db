"""Time limits: every stage of a run ends within a bound derived from its work, even when a call never returns.

A read from a dead network mount, a FIFO without a writer, or a model call that hangs blocks inside C code, where
Python cannot interrupt it (Prefect's task time-outs raise in the task's thread at its next bytecode, which never
comes). So a stage runs in a daemon thread of its own and the caller waits for it with a time-out: when the limit
passes, the caller gets ``StageTimeout`` saying what the stage was doing, and goes on; the stuck thread is
abandoned (a daemon: it does not keep the process from exiting).
"""

from __future__ import annotations

import contextvars
import threading
import time
from dataclasses import dataclass
from typing import Callable, TypeVar

from mess_ai.errors import MessError

T = TypeVar("T")


class StageTimeout(MessError):
    """A stage did not finish within its time limit."""

    def __init__(self, what: str, seconds: float, doing: str | None = None, track_id: str | None = None,
                 stage: str | None = None) -> None:
        self.what, self.seconds, self.doing, self.track_id, self.stage = what, seconds, doing, track_id, stage
        super().__init__(f"{what} did not finish within its time limit of {seconds:.0f} s"
                         + (f" (stuck {doing})" if doing else ""))


class Activity:
    """What each thread of a run is doing right now ('decoding a.wav'), for the message of a time-out."""

    def __init__(self) -> None:
        self._doing: dict[int, tuple[str, str | None, str | None]] = {}
        self._lock = threading.Lock()

    def set(self, doing: str, track_id: str | None = None, stage: str | None = None) -> None:
        """``doing``: words for a person; ``track_id`` and ``stage``: the file it is done to, and the pipeline
        stage, when it is about one file."""
        with self._lock:
            self._doing[threading.get_ident()] = (doing, track_id, stage)

    def clear(self) -> None:
        with self._lock:
            self._doing.pop(threading.get_ident(), None)

    def of(self, thread_id: int) -> tuple[str | None, str | None, str | None]:
        """(what the thread is doing, the track it is doing it to, the stage), or Nones."""
        with self._lock:
            return self._doing.get(thread_id, (None, None, None))


def run_within(function: Callable[[], T], seconds: float, what: str, activity: Activity | None = None) -> T:
    """``function()`` in a daemon thread (with the caller's context variables); its result, or its exception, if
    it ends within ``seconds``; else ``StageTimeout`` naming what it was doing (from ``activity``)."""
    if seconds <= 0:
        raise ValueError(f"a time limit must be positive, got {seconds}")
    outcome: dict[str, object] = {}
    context = contextvars.copy_context()

    def target() -> None:
        try:
            outcome["result"] = context.run(function)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            outcome["error"] = exc
        finally:
            if activity is not None:
                activity.clear()

    worker = threading.Thread(target=target, name=f"mess-ai-{what}"[:60], daemon=True)
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        doing, track_id, stage = activity.of(worker.ident) if activity is not None else (None, None, None)
        raise StageTimeout(what, seconds, doing, track_id, stage)
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["result"]  # type: ignore[return-value]


@dataclass(frozen=True)
class TimeLimits:
    """How long each part of a run may take, derived from its work; ``None`` fields take the derived value.

    A chunk: ``base_seconds`` (model loading, start-up) plus ``seconds_per_audio_second`` for each second of audio
    in it (its headers' durations) plus ``seconds_per_file``: on a CPU the 95M model runs at ~3x real time on two
    cores, on a GPU hundreds of times faster, so the default bound is loose for every machine that works and still
    ends a hung night. Listing, validating and checking: ``base_seconds`` plus ``seconds_per_file`` per file. The
    run: its stages' limits added up, or ``run_seconds``.
    """

    base_seconds: float = 600.0
    seconds_per_audio_second: float = 2.0
    seconds_per_file: float = 1.0
    chunk_seconds: float | None = None
    run_seconds: float | None = None

    def __post_init__(self) -> None:
        for name in ("base_seconds", "chunk_seconds", "run_seconds", "seconds_per_audio_second",
                     "seconds_per_file"):
            value = getattr(self, name)
            if value is not None and (value < 0 if name.startswith("seconds_per") else value <= 0):
                raise ValueError(f"time limit {name} must be {'>= 0' if name.startswith('seconds_per') else '> 0'}, "
                                 f"got {value}")

    def chunk(self, audio_seconds: float, files: int) -> float:
        if self.chunk_seconds is not None:
            return self.chunk_seconds
        return self.base_seconds + self.seconds_per_audio_second * audio_seconds + self.seconds_per_file * files

    def stage(self, files: int) -> float:
        """Listing a folder, validating or checking ``files`` files."""
        return self.base_seconds + self.seconds_per_file * files

    def run(self, chunk_limits: list[float], files: int) -> float:
        """Discovery, validation and the final check, plus every chunk one after the other."""
        if self.run_seconds is not None:
            return self.run_seconds
        return 3 * self.stage(files) + sum(chunk_limits)


class Deadline:
    """The end of a run that may take ``seconds`` in all, of which ``elapsed`` have passed already."""

    def __init__(self, seconds: float, elapsed: float = 0.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.seconds = seconds
        self._clock = clock
        self._end = clock() + seconds - elapsed

    def remaining(self) -> float:
        return self._end - self._clock()

    def passed(self) -> bool:
        return self.remaining() <= 0
