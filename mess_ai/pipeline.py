"""The extraction pipeline as a library call: discover → validate → load → extract → write → integrity.

Plain Python, no Prefect: the CLI and the Prefect tasks call these same functions. A bad file is recorded in
the manifest with its stage and reason, and the run goes on. Unchanged files are skipped without loading
the model. Every output is written atomically and a track is marked done only once all its files are in place.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import platform
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

import mess_ai
from mess_ai.audio import AudioSource, WindowSpec, discover_audio, load_mono, probe_audio, window_bounds
from mess_ai.errors import InputError, MessError, TrackBusyError
from mess_ai.features.extractor import Extractor, TrackJob, resolve_precision
from mess_ai.features.model import DEFAULT_MODEL, LoadedModel, get_model, model_fingerprint, resolve_device
from mess_ai.store import DONE, FAILED, ExpectedShapes, FeatureStore
from mess_ai.store.integrity import IntegrityReport, check_dataset
from mess_ai.store.keys import FEATURE_FORMAT_VERSION, config_key, sha256_file

log = logging.getLogger(__name__)

STAGES = ("discover", "validate", "load", "extract", "write", "integrity")


@dataclass(frozen=True)
class ExtractConfig:
    """Everything that says how features are extracted; recorded with the outputs (provenance.json)."""

    model: str = DEFAULT_MODEL
    revision: str | None = None
    device: str = "auto"
    precision: str = "auto"
    batch_size: int | None = None
    keep_raw: bool = False
    window: WindowSpec = field(default_factory=WindowSpec)
    trust_remote_code: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def key(self) -> str:
        """The content key of this config: same key, same features (batch size and raw do not change them)."""
        precision = resolve_precision(self.precision, resolve_device(self.device))
        return config_key({"model": model_fingerprint(self.model, self.revision), "window": self.window.to_dict(),
                           "precision": precision})


@dataclass
class FileOutcome:
    track_id: str
    relative_path: str
    status: str  # done | failed | unchanged | previously_failed
    stage: str | None = None
    error_class: str | None = None
    reason: str | None = None
    attempts: int = 0
    duration_seconds: float | None = None
    seconds: float = 0.0


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
    audio_seconds: float = 0.0
    wall_seconds: float = 0.0
    model_loaded: bool = False
    stage_seconds: dict[str, float] = field(default_factory=lambda: {s: 0.0 for s in STAGES})
    outcomes: list[FileOutcome] = field(default_factory=list)
    integrity_problems: list[str] = field(default_factory=list)

    @property
    def real_time_factor(self) -> float | None:
        """Audio seconds extracted per wall-clock second (None when nothing was extracted)."""
        return self.audio_seconds / self.wall_seconds if self.audio_seconds and self.wall_seconds else None

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


ProgressCallback = Callable[[str, dict[str, Any]], None]


@dataclass(eq=False)
class _Track:
    """What the pipeline carries with a job: the source, its lock, and the open raw file if any."""

    source: AudioSource
    lock: Any
    attempts: int
    started: float
    duration_seconds: float = 0.0
    resources: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)
    raw: Any = None


def _versions() -> dict[str, str]:
    import soundfile
    import soxr
    import torch
    import transformers

    return {"mess_ai": mess_ai.__version__, "python": platform.python_version(), "numpy": np.__version__,
            "torch": torch.__version__, "transformers": transformers.__version__,
            "soundfile": soundfile.__version__, "libsndfile": soundfile.__libsndfile_version__,
            "soxr": soxr.__version__}


def build_provenance(config: ExtractConfig, model: LoadedModel, key: str) -> dict[str, Any]:
    return {
        "config_key": key,
        "feature_format_version": FEATURE_FORMAT_VERSION,
        "model": config.model,
        "revision": config.revision,
        "model_fingerprint": model_fingerprint(config.model, config.revision),
        "sampling_rate": model.sampling_rate,
        "do_normalize": model.do_normalize,
        "window_seconds": config.window.window_seconds,
        "hop_seconds": config.window.hop_seconds,
        "min_duration_seconds": config.window.min_duration_seconds,
        "num_hidden_states": model.num_hidden_states,
        "hidden_size": model.hidden_size,
        "layers": list(range(model.num_hidden_states)),
        "precision": resolve_precision(config.precision, model.device),
        "scales": {
            "aggregated": "float32 [n_hidden_states, hidden_size]: mean over all windows and frames",
            "segments": "float32 [n_windows, n_hidden_states, hidden_size]: mean over each window's frames",
            "raw": "float16 [n_windows, n_hidden_states, frames, hidden_size] (only with keep_raw)",
        },
        "versions": _versions(),
    }


def _prefetch(items: Iterator[TrackJob], depth: int, on_abandon: Callable[[TrackJob], None]) -> Iterator[TrackJob]:
    """Run ``items`` in a thread, ``depth`` ahead, so decoding the next files overlaps model work."""
    buffer: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    end = object()

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        buffer.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                else:
                    on_abandon(item)
                    return
            buffer.put(end)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            buffer.put(exc)

    worker = threading.Thread(target=produce, name="mess-ai-prefetch", daemon=True)
    worker.start()
    try:
        while (item := buffer.get()) is not end:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        worker.join()
        while not buffer.empty():
            item = buffer.get_nowait()
            if isinstance(item, TrackJob):
                on_abandon(item)


class _Run:
    """One extraction run over one folder into one dataset of a store."""

    def __init__(self, audio_dir: Path, store: FeatureStore, config: ExtractConfig, only_failed: bool,
                 progress: ProgressCallback | None, summary: RunSummary) -> None:
        self.audio_dir = audio_dir
        self.store = store
        self.config = config
        self.only_failed = only_failed
        self.progress = progress or (lambda event, info: None)
        self.summary = summary
        self.key = config.key()
        self.stage_lock = threading.Lock()

    def _timed(self, stage: str, started: float) -> None:
        with self.stage_lock:
            self.summary.stage_seconds[stage] += time.perf_counter() - started

    def _record(self, outcome: FileOutcome) -> None:
        self.summary.outcomes.append(outcome)
        if outcome.status in ("done", "failed"):
            setattr(self.summary, outcome.status, getattr(self.summary, outcome.status) + 1)
        self.progress("file", dataclasses.asdict(outcome))

    # --- planning: what needs work ---------------------------------------------------------------------
    def plan(self, sources: list[AudioSource]) -> list[AudioSource]:
        """Sources needing extraction; the rest are recorded as unchanged or previously failed."""
        started = time.perf_counter()
        rows = self.store.manifest.rows_by_track(self.store.dataset)
        provenance = self.store.read_provenance() or {}
        same_config = provenance.get("config_key") == self.key
        pending = []
        for source in sources:
            row = rows.get(source.track_id)
            if self.only_failed:
                if row is not None and row["status"] == FAILED:
                    pending.append(source)
                continue
            if row is None or row["config_key"] != self.key or row["status"] not in (DONE, FAILED):
                pending.append(source)
                continue
            try:
                sha = self._content_hash(source, row)
            except OSError:
                pending.append(source)  # unreadable now: the attempt records why
                continue
            if sha != row["sha256"]:
                pending.append(source)
            elif row["status"] == DONE and same_config and self.store.outputs_valid(
                    source.track_id, ExpectedShapes(row["n_windows"], provenance["num_hidden_states"],
                                                    provenance["hidden_size"]), self.config.keep_raw):
                self.summary.unchanged += 1
                self.summary.outcomes.append(FileOutcome(source.track_id, source.relative, "unchanged"))
            elif row["status"] == FAILED and row["permanent"]:
                self.summary.previously_failed += 1
                self.summary.outcomes.append(FileOutcome(
                    source.track_id, source.relative, "previously_failed", row["failure_stage"],
                    row["error_class"], row["error_message"], row["attempts"], row["duration_seconds"]))
            else:
                pending.append(source)
        self._timed("discover", started)
        return pending

    @staticmethod
    def _content_hash(source: AudioSource, row: dict[str, Any] | None) -> str:
        """sha256 of the file's bytes, reused from the manifest while size and mtime are unchanged."""
        stat = source.path.stat()
        if row is not None and row["size"] == stat.st_size and row["mtime_ns"] == stat.st_mtime_ns and row["sha256"]:
            return row["sha256"]
        return sha256_file(source.path)

    # --- per-file preparation (runs in the prefetch thread) -----------------------------------------------
    def _fail(self, track: _Track, stage: str, exc: BaseException) -> None:
        permanent = isinstance(exc, InputError)
        reason = exc.reason if isinstance(exc, InputError) else (str(exc) or type(exc).__name__)
        seconds = time.perf_counter() - track.started
        track.resources.close()
        self.store.remove_outputs(track.source.track_id)
        self.store.manifest.mark_failed(self.store.dataset, track.source.track_id, stage=stage,
                                        error_class=type(exc).__name__, message=reason, permanent=permanent,
                                        seconds_spent=seconds, duration_seconds=track.duration_seconds or None)
        track.lock.release()
        log.warning("Failed at %s: %s: %s", stage, track.source.relative, reason)
        self._record(FileOutcome(track.source.track_id, track.source.relative, "failed", stage,
                                 type(exc).__name__, reason, track.attempts, track.duration_seconds or None,
                                 seconds))

    def _abandon(self, job: TrackJob) -> None:
        track: _Track = job.context
        track.resources.close()
        track.lock.release()

    def _lock(self, source: AudioSource, wait: bool) -> Any | None:
        lock = self.store.lock(source.track_id)
        try:
            lock.acquire(blocking=wait)
        except TrackBusyError:
            return None
        return lock

    def prepare(self, sources: list[AudioSource], sampling_rate: int) -> Iterator[TrackJob]:
        deferred = []
        for source in sources:
            lock = self._lock(source, wait=False)
            if lock is None:
                deferred.append(source)
                continue
            job = self._prepare_one(source, lock, sampling_rate)
            if job is not None:
                yield job
        for source in deferred:
            # Another run holds these; wait for it, then skip them if it finished them.
            log.info("Waiting for another run to finish %s", source.relative)
            lock = self._lock(source, wait=True)
            job = self._prepare_one(source, lock, sampling_rate)
            if job is not None:
                yield job

    def _prepare_one(self, source: AudioSource, lock: Any, sampling_rate: int) -> TrackJob | None:
        started = time.perf_counter()
        row = self.store.manifest.get(self.store.dataset, source.track_id)
        try:
            stat = source.path.stat()
            sha = self._content_hash(source, row)
        except OSError as exc:
            stat, sha = None, None
            hash_error: OSError | None = exc
        else:
            hash_error = None
        if (row is not None and not self.only_failed and row["status"] == DONE and row["sha256"] == sha
                and row["config_key"] == self.key):
            provenance = self.store.read_provenance() or {}
            if provenance.get("config_key") == self.key and self.store.outputs_valid(
                    source.track_id, ExpectedShapes(row["n_windows"], provenance["num_hidden_states"],
                                                    provenance["hidden_size"]), self.config.keep_raw):
                lock.release()  # finished by another run while we waited
                self.summary.unchanged += 1
                self.summary.outcomes.append(FileOutcome(source.track_id, source.relative, "unchanged"))
                return None
        attempts = self.store.manifest.begin_attempt(
            self.store.dataset, source.track_id, source_path=str(source.path), relative_path=source.relative,
            size=stat.st_size if stat else None, mtime_ns=stat.st_mtime_ns if stat else None, sha256=sha,
            config_key=self.key)
        track = _Track(source, lock, attempts, started)
        for temp in self.store.temp_files(source.track_id):
            temp.unlink(missing_ok=True)  # left by a killed run; we hold the lock now
        if hash_error is not None:
            self._fail(track, "validate", hash_error)
            return None
        stage = "validate"
        try:
            t0 = time.perf_counter()
            probe_audio(source.path, self.config.window.min_duration_seconds)
            self._timed("validate", t0)
            stage = "load"
            t0 = time.perf_counter()
            signal = load_mono(source.path, sampling_rate)
            track.duration_seconds = len(signal) / sampling_rate
            bounds = window_bounds(len(signal), sampling_rate, self.config.window)
            self._timed("load", t0)
        except InputError as exc:
            self._fail(track, exc.stage, exc)
            return None
        except ValueError as exc:  # window_bounds: decoded audio shorter than the minimum
            self._fail(track, stage, InputError(source.path, str(exc), stage))
            return None
        except Exception as exc:  # noqa: BLE001 - recorded; transient ones are retried next run
            self._fail(track, stage, exc)
            return None
        return TrackJob(source.track_id, signal, bounds, context=track)

    # --- model output to the store ----------------------------------------------------------------------------
    def on_raw(self, job: TrackJob, index: int, window: np.ndarray) -> None:
        track: _Track = job.context
        if track.raw is None:
            track.raw = track.resources.enter_context(
                self.store.raw_writer(job.track_id, (job.n_windows, *window.shape)))
        track.raw[index] = window

    def finish(self, job: TrackJob) -> None:
        track: _Track = job.context
        if job.error is not None:
            self._fail(track, "extract", job.error)
            return
        t0 = time.perf_counter()
        try:
            segments = job.segments
            if not np.isfinite(segments).all():
                raise MessError("the model produced non-finite values (NaN or inf)")
            self.store.write_segments(job.track_id, segments, job.aggregated())
            track.resources.close()  # puts the raw file in place
            self._timed("write", t0)
            t0 = time.perf_counter()
            shapes = ExpectedShapes(job.n_windows, segments.shape[1], segments.shape[2])
            if not self.store.outputs_valid(job.track_id, shapes, self.config.keep_raw):
                raise MessError("the written files do not read back with the expected shapes")
            self._timed("integrity", t0)
        except Exception as exc:  # noqa: BLE001 - e.g. disk full: recorded, retried next run
            self._fail(track, "write", exc)
            return
        seconds = time.perf_counter() - track.started
        self.store.manifest.mark_done(self.store.dataset, job.track_id, duration_seconds=track.duration_seconds,
                                      n_windows=job.n_windows, seconds_spent=seconds)
        track.lock.release()
        self.summary.audio_seconds += track.duration_seconds
        self._record(FileOutcome(job.track_id, track.source.relative, "done", attempts=track.attempts,
                                 duration_seconds=track.duration_seconds, seconds=seconds))


def run_extraction(
    audio_dir: str | Path,
    store_root: str | Path,
    *,
    dataset: str | None = None,
    config: ExtractConfig | None = None,
    only_failed: bool = False,
    manifest_url: str | None = None,
    progress: ProgressCallback | None = None,
    model_loader: Callable[..., LoadedModel] = get_model,
    prefetch: int = 2,
) -> RunSummary:
    """Extract features for every new or changed audio file under ``audio_dir`` into ``store_root``.

    ``dataset`` defaults to the audio folder's name. ``only_failed`` re-runs just the files whose last attempt
    failed. Raises ``FileNotFoundError`` for a missing folder, ``ModelError`` when the model cannot be loaded
    and ``StoreError`` when the store cannot be used; a bad audio file never raises, it is recorded.
    """
    wall_started = time.perf_counter()
    config = config or ExtractConfig()
    audio_dir = Path(audio_dir)
    if not audio_dir.is_dir():
        raise FileNotFoundError(f"audio folder {audio_dir} does not exist or is not a folder")
    store = FeatureStore(store_root, dataset or audio_dir.absolute().name, manifest_url)
    summary = RunSummary(str(audio_dir), str(store.root), store.dataset)
    try:
        run = _Run(audio_dir, store, config, only_failed, progress, summary)
        t0 = time.perf_counter()
        sources = discover_audio(audio_dir)
        summary.discovered = len(sources)
        run._timed("discover", t0)
        store.sweep_temp_files()
        pending = run.plan(sources)
        log.info("Found %d audio files in %s: %d to extract, %d unchanged, %d failed before (unchanged).",
                 len(sources), audio_dir, len(pending), summary.unchanged, summary.previously_failed)
        run.progress("plan", {"discovered": len(sources), "pending": len(pending), "unchanged": summary.unchanged,
                              "previously_failed": summary.previously_failed})
        if pending:
            model = model_loader(config.model, config.revision, config.device,
                                 trust_remote_code=config.trust_remote_code)
            summary.model_loaded = True
            provenance = build_provenance(config, model, run.key)
            if store.read_provenance() != provenance:
                store.write_provenance(provenance)
            extractor = Extractor(model, round(config.window.window_seconds * model.sampling_rate),
                                  config.batch_size, config.precision, config.keep_raw)
            jobs = run.prepare(pending, model.sampling_rate)
            if prefetch > 0:
                jobs = _prefetch(jobs, prefetch, run._abandon)
            for job in extractor.run(jobs, on_raw=run.on_raw if config.keep_raw else None):
                run.finish(job)
            summary.stage_seconds["extract"] = extractor.stats.model_seconds
        t0 = time.perf_counter()
        report = IntegrityReport()
        check_dataset(store, report, check_values=False)
        summary.integrity_problems = [f"{p.path or p.track_id}: {p.reason}" for p in report.problems]
        run._timed("integrity", t0)
    finally:
        store.close()
    summary.wall_seconds = time.perf_counter() - wall_started
    log.info("Done: %d extracted, %d failed, %d unchanged in %.1f s.", summary.done, summary.failed,
             summary.unchanged, summary.wall_seconds)
    return summary


async def run_extraction_async(audio_dir: str | Path, store_root: str | Path, **kwargs: Any) -> RunSummary:
    """``run_extraction`` off the event loop (for async callers such as a web backend)."""
    return await asyncio.to_thread(run_extraction, audio_dir, store_root, **kwargs)
