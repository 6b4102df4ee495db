"""The model's side of extraction: the model, loaded on first use only (the dataset's provenance written with it),
and prepared tracks run through it inside a slot, each track's features written and checked as its windows
complete."""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Any, Callable, ContextManager, Iterable, Iterator

from mess_ai.config import ExtractConfig
from mess_ai.deadline import Activity
from mess_ai.extraction.provenance import build_provenance
from mess_ai.extraction.stats import FileOutcome, RunStats
from mess_ai.extraction.steps import check_written, extractor_for, load_model, write_features
from mess_ai.extraction.track import TrackAttempt
from mess_ai.features.extractor import Extractor, TrackJob
from mess_ai.features.loaded import LoadedModel
from mess_ai.store import FeatureStore


class ModelStage:
    """Extract and write, for one dataset of ``store`` and one config (content ``key``, ``precision`` and model
    ``identity`` resolved by the session); outcomes and timings go to ``stats``. Thread-safe: chunks of the flows
    share it, and the model is loaded once."""

    def __init__(self, config: ExtractConfig, store: FeatureStore, key: str, precision: str,
                 identity: dict[str, Any], loader: Callable[..., LoadedModel], stats: RunStats,
                 activity: Activity) -> None:
        self.config, self.store, self.key, self.precision, self.identity = config, store, key, precision, identity
        self.loader, self.stats, self.activity = loader, stats, activity
        self._model: LoadedModel | None = None
        self._extractor: Extractor | None = None
        self._lock = threading.Lock()

    @property
    def loaded(self) -> bool:
        return self._model is not None

    def model(self) -> LoadedModel:
        """The model, loaded on first use only (a run with nothing new never loads it)."""
        with self._lock:
            if self._model is None:
                started = time.perf_counter()
                model = load_model(self.config, self.identity, self.precision, self.store.dataset, self.loader)
                self.stats.add_model_load(time.perf_counter() - started)
                provenance = build_provenance(self.config, model, self.key, self.precision, self.identity)
                if self.store.read_provenance() != provenance:
                    self.store.write_provenance(provenance)
                self._extractor = extractor_for(model, self.config, self.precision)
                self._model = model
            return self._model

    def extract(self, jobs: Iterable[TrackJob], slot: Callable[[], ContextManager] = contextlib.nullcontext
                ) -> list[FileOutcome]:
        """Run prepared tracks through the model and write them; model work happens inside ``slot()``.

        Whatever stops it (the manifest cannot be written, a closed generator), every track it was handed is
        given back: those in hand and those prepared ahead keep their rows pending, and the next run redoes them.
        """
        outcomes: list[FileOutcome] = []
        taken: list[TrackJob] = []
        listed = list(jobs) if isinstance(jobs, (list, tuple)) else []

        def take() -> Iterator[TrackJob]:
            for job in jobs:
                taken.append(job)
                yield job

        try:
            self.model()
            self.activity.set("waiting for the model (the run's GPU slot, or another chunk's model work)")
            with slot():
                outcomes = self._run(take(), _model_work_words(listed))
        finally:
            if hasattr(jobs, "close"):
                jobs.close()
            for job in [*taken, *listed]:
                job.context.give_back()
        self.stats.add("extract", files=len(outcomes), audio_seconds=sum(o.duration_seconds or 0.0 for o in outcomes))
        return outcomes

    def _run(self, jobs: Iterator[TrackJob], doing: str) -> list[FileOutcome]:
        """The model's work on ``jobs``, each written as it completes; timed as one interval of model work."""
        outcomes = []
        started_wall, before = time.time(), self._extractor.stats.model_seconds
        try:
            with self.stats.watch("extract"):
                on_raw = _write_raw_window if self.config.keep_raw else None
                self.activity.set(doing)
                for job in self._extractor.run(jobs, on_raw=on_raw):
                    outcomes.append(self._finish(job))
                    self.activity.set(doing)
        finally:
            self.stats.add_model_work(started_wall, time.time(), self._extractor.stats.model_seconds - before,
                                      self._extractor.stats.first_batch_at)
        return outcomes

    def _finish(self, job: TrackJob) -> FileOutcome:
        """Write the features of a track the model is done with, check them, and record its outcome."""
        track: TrackAttempt = job.context
        if job.error is not None:
            return self.stats.record(track.failed("extract", job.error))
        try:
            self.activity.set(f"writing the features of {track.source.relative}", job.track_id, "write")
            with self.stats.stage("write", files=1, audio_seconds=track.duration_seconds):
                write_features(self.store, job)
            with self.stats.stage("integrity", files=1, audio_seconds=track.duration_seconds):
                check_written(self.store, job, self.config.keep_raw)
        except Exception as exc:  # noqa: BLE001 - e.g. disk full: recorded, retried
            return self.stats.record(track.failed("write", exc))
        return self.stats.record(track.done(job.n_windows))


def _write_raw_window(job: TrackJob, index: int, window: Any) -> None:
    job.context.write_raw_window(index, window, job.n_windows)


def _model_work_words(jobs: list[TrackJob]) -> str:
    """'running the model on a.wav, b.wav, c.wav and 2 more': what model work is on, for a time-out's message."""
    names = [job.context.source.relative for job in jobs]
    return "running the model" + (f" on {', '.join(names[:3])}" if names else "") + (
        f" and {len(names) - 3} more" if len(names) > 3 else "")
