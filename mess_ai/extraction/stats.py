"""What a run did: seconds, files and audio seconds per stage, each file's outcome, the counts every report shows,
and the intervals of model work; ``RunStats`` tallies them as the run goes, ``RunSummary`` is the result."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Iterable, Iterator

import psutil

from mess_ai.monitoring import ResourceMonitor

STAGES = ("discover", "validate", "preprocess", "extract", "write", "integrity")

ProgressCallback = Callable[[str, dict[str, Any]], None]


@dataclass
class FileOutcome:
    track_id: str
    relative_path: str
    status: str  # done | failed | unchanged | previously_failed | busy (left to a concurrent run)
    stage: str | None = None
    error_class: str | None = None
    reason: str | None = None
    attempts: int = 0
    duration_seconds: float | None = None
    seconds: float = 0.0
    permanent: bool | None = None
    device: str | None = None  # the device its model work ran on ('cuda:1'); None when it never reached the model


# What became of each file found, in the order every report lists them: (RunSummary field, what a person reads).
FILE_CATEGORIES = (
    ("done", "done (extracted now)"),
    ("failed", "failed now"),
    ("unchanged", "unchanged (skipped)"),
    ("previously_failed", "failed before, same bytes (not retried)"),
    ("busy", "busy (another run holds it)"),
    ("not_selected", "not selected"),
    ("left", "left for the next run (stopped early)"),
)


@dataclass(frozen=True)
class FileCounts:
    """Every file found, in exactly one category: ``discovered == sum of the categories``.

    ``not_selected``: outside this run's choice (a retry-failed run takes the failed files only, a shard its own
    files). ``left``: chosen but not settled (yet): during a run, the files still to do; at its end, files a run
    that stopped early leaves to the next one.
    """

    discovered: int = 0
    done: int = 0
    failed: int = 0
    unchanged: int = 0
    previously_failed: int = 0
    busy: int = 0
    not_selected: int = 0
    left: int = 0

    def categories(self, empty: bool = True) -> list[tuple[str, int]]:
        """(label, count) of every category, in report order; the counts sum to ``discovered``. Without ``empty``,
        done and failed always, the others when they hold files."""
        return [(label, getattr(self, name)) for name, label in FILE_CATEGORIES
                if empty or getattr(self, name) or name in ("done", "failed")]

    @property
    def new_or_changed(self) -> int:
        """Files that needed work in this run (new, changed, or failed and retried)."""
        return self.done + self.failed + self.busy + self.left

    @property
    def settled(self) -> int:
        return self.discovered - self.left

    def describe(self, finished: bool = True) -> str:
        """'6 found = 1 done (extracted now) + 1 failed now + 4 unchanged (skipped)' (the categories without
        ``empty``); while the run goes on (not ``finished``) the files left read 'to do'."""
        left_label = dict(FILE_CATEGORIES)["left"]
        parts = [f"{count} {'to do' if label == left_label and not finished else label}"
                 for label, count in self.categories(empty=False)]
        return f"{self.discovered} found = " + " + ".join(parts)


@dataclass
class RunSummary:
    audio_dir: str
    store: str
    dataset: str
    discovered: int = 0
    unchanged: int = 0
    previously_failed: int = 0
    done: int = 0
    failed: int = 0
    busy: int = 0
    not_selected: int = 0
    left: int = 0
    audio_seconds: float = 0.0
    wall_seconds: float = 0.0
    model_loaded: bool = False
    stage_seconds: dict[str, float] = field(default_factory=dict)
    stage_files: dict[str, int] = field(default_factory=dict)
    stage_audio_seconds: dict[str, float] = field(default_factory=dict)
    # One per file the plan chose for work, and per file that failed before; files skipped as unchanged are counted
    # in ``unchanged`` only.
    outcomes: list[FileOutcome] = field(default_factory=list)
    integrity_problems: list[str] = field(default_factory=list)
    resources: dict[str, Any] = field(default_factory=dict)
    # (start, end, device): wall-clock intervals during which this run held a device for model work.
    model_work: list[tuple[float, float, str]] = field(default_factory=list)
    # Seconds this run spent getting its model ready (importing transformers if this process had not, reading the
    # checkpoint, building the model, moving it to the device; next to nothing when this process had loaded it
    # already); None when the run needed no model.
    model_load_seconds: float | None = None
    # Seconds from the start of this process (for `mess-ai extract`, of the command) to the first batch of windows
    # entering the model; None when no window was run.
    first_window_seconds: float | None = None

    @property
    def real_time_factor(self) -> float | None:
        """Audio seconds extracted per wall-clock second (None when nothing was extracted)."""
        return self.audio_seconds / self.wall_seconds if self.audio_seconds and self.wall_seconds else None

    @property
    def counts(self) -> FileCounts:
        """What became of every file found (the numbers every report shows)."""
        return FileCounts(**{f.name: getattr(self, f.name) for f in dataclasses.fields(FileCounts)})

    @property
    def files_by_device(self) -> dict[str, int]:
        """Files whose model work ran on each device (done or failed there), by device name."""
        counts: dict[str, int] = {}
        for outcome in self.outcomes:
            if outcome.device is not None:
                counts[outcome.device] = counts.get(outcome.device, 0) + 1
        return dict(sorted(counts.items()))

    @property
    def failures(self) -> list[FileOutcome]:
        return [o for o in self.outcomes if o.status in ("failed", "previously_failed")]

    @property
    def exit_code(self) -> int:
        """0 when every file is done and the store is clean, 1 otherwise."""
        return 0 if not self.failures and not self.integrity_problems else 1

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["real_time_factor"] = self.real_time_factor
        data["exit_code"] = self.exit_code
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunSummary":
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in fields}
        values["outcomes"] = [FileOutcome(**o) for o in data.get("outcomes", [])]
        values["model_work"] = [tuple(w) for w in data.get("model_work", [])]
        return cls(**values)


class RunStats:
    """The tally of one run, kept as it goes; thread-safe (the flows run stages of different chunks in threads).

    Outcomes are kept per track, the latest attempt winning, so a retried chunk replaces what its failed attempt
    recorded. ``monitor``, when given, watches the resources of each stage; ``progress`` hears of each outcome.
    """

    def __init__(self, monitor: ResourceMonitor | None = None, progress: ProgressCallback | None = None) -> None:
        self.monitor = monitor
        self.progress = progress
        self.stage_seconds = {s: 0.0 for s in STAGES}
        self.stage_files = {s: 0 for s in STAGES}
        self.stage_audio_seconds = {s: 0.0 for s in STAGES}
        self.outcomes: dict[str, FileOutcome] = {}
        self.model_work: list[tuple[float, float, str]] = []
        self.model_load_seconds: float | None = None
        self.first_window_at: float | None = None  # time.time() when the first batch entered the model
        self.discovered = 0
        self.not_selected = 0
        # Files the plan found unchanged: counted, not itemised in ``outcomes`` (a run over 100,000 done tracks would
        # carry 100,000 entries into its result, which Prefect walks through item by item).
        self.unchanged = 0
        self.selected: set[str] = set()  # track ids of the files chosen for work by the plan
        self._lock = threading.RLock()

    @contextlib.contextmanager
    def stage(self, stage: str, files: int = 0, audio_seconds: float = 0.0) -> Iterator[None]:
        """Time the block as work of ``stage`` on ``files`` files holding ``audio_seconds`` of audio."""
        started = time.perf_counter()
        with self.watch(stage):
            try:
                yield
            finally:
                self.add(stage, time.perf_counter() - started, files, audio_seconds)

    def watch(self, stage: str) -> ContextManager[Any]:
        """The resources used during the block, as those of ``stage`` (not timed)."""
        return self.monitor.stage(stage) if self.monitor else contextlib.nullcontext()

    def add(self, stage: str, seconds: float = 0.0, files: int = 0, audio_seconds: float = 0.0) -> None:
        with self._lock:
            self.stage_seconds[stage] += seconds
            self.stage_files[stage] += files
            self.stage_audio_seconds[stage] += audio_seconds

    def add_model_work(self, started_wall: float, ended_wall: float, device: str) -> None:
        """One interval (wall-clock times) during which this run held ``device`` for model work."""
        with self._lock:
            self.model_work.append((started_wall, ended_wall, device))

    def add_first_window(self, first_window_at: float | None) -> None:
        """When a batch first entered the model (``time.time()``; None: no batch ran) on one of the run's devices:
        the run's first window is the earliest."""
        if first_window_at is not None:
            with self._lock:
                self.first_window_at = min(first_window_at, self.first_window_at or first_window_at)

    def add_model_load(self, seconds: float) -> None:
        with self._lock:
            self.model_load_seconds = (self.model_load_seconds or 0.0) + seconds

    def found(self, files: int) -> None:
        with self._lock:
            self.discovered = files
            self.stage_files["discover"] += files

    def planned(self, selected: Iterable[str], not_selected: int, unchanged: int = 0) -> None:
        """The track ids a plan chose for work, how many files it did not choose, and how many it skipped as
        unchanged."""
        with self._lock:
            self.not_selected += not_selected
            self.unchanged += unchanged
            self.selected.update(selected)

    def record(self, outcome: FileOutcome, announce: bool = True) -> FileOutcome:
        """Keep ``outcome`` (the track's latest) and, with ``announce``, tell ``progress`` about it."""
        with self._lock:
            self.outcomes[outcome.track_id] = outcome
        if announce and self.progress is not None:
            self.progress("file", dataclasses.asdict(outcome))
        return outcome

    def counts(self) -> FileCounts:
        """What became of every file found so far: each outcome's status, the files the plan did not select, and
        the selected ones without an outcome (still to do; left for the next run once the run has stopped)."""
        with self._lock:
            statuses = [o.status for o in self.outcomes.values()]
            return FileCounts(
                discovered=self.discovered, done=statuses.count("done"), failed=statuses.count("failed"),
                unchanged=self.unchanged + statuses.count("unchanged"),
                previously_failed=statuses.count("previously_failed"),
                busy=statuses.count("busy"), not_selected=self.not_selected,
                left=sum(track_id not in self.outcomes for track_id in self.selected))

    def summary(self, audio_dir: str, store: str, dataset: str, wall_seconds: float, integrity_problems: list[str],
                model_loaded: bool) -> RunSummary:
        with self._lock:
            outcomes = sorted(self.outcomes.values(), key=lambda o: o.relative_path)
            counts = self.counts()
            return RunSummary(
                audio_dir=audio_dir, store=store, dataset=dataset, **dataclasses.asdict(counts),
                audio_seconds=sum(o.duration_seconds or 0.0 for o in outcomes if o.status == "done"),
                wall_seconds=wall_seconds, model_loaded=model_loaded,
                stage_seconds=dict(self.stage_seconds), stage_files=dict(self.stage_files),
                stage_audio_seconds=dict(self.stage_audio_seconds), outcomes=outcomes,
                integrity_problems=integrity_problems,
                resources=self.monitor.report.to_dict() if self.monitor and self.monitor.report else {},
                model_work=list(self.model_work), model_load_seconds=self.model_load_seconds,
                first_window_seconds=None if self.first_window_at is None
                else self.first_window_at - process_started_at())


def process_started_at() -> float:
    """When this process started, as a ``time.time()`` value: on Linux from its start in clock ticks since boot
    (to 10 ms), elsewhere psutil's create time (Linux's would be off by up to a second: it adds the boot time in
    whole seconds)."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            with open(f"/proc/{os.getpid()}/stat", encoding="ascii") as stat:
                # Field 22, counted after the command name, which may itself hold spaces and parentheses.
                start_ticks = int(stat.read().rpartition(")")[2].split()[19])
            age = time.clock_gettime(time.CLOCK_BOOTTIME) - start_ticks / os.sysconf("SC_CLK_TCK")
            return time.time() - age
    return psutil.Process().create_time()
