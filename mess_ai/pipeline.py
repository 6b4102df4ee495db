"""The extraction pipeline: discover → validate → preprocess → extract → write → integrity.

``ExtractionSession`` puts the stages together for one dataset of a store and one config; ``run_extraction`` runs
them in plain Python, and the Prefect flow (``flows/extract.py``) runs the same stages as tasks over chunks of
files. A bad file is recorded in the manifest with its stage and reason, and the run goes on. Unchanged files are
skipped without loading the model. Every output is written atomically, and a track is marked done only once all
its files are in place. The parts live in ``mess_ai.extraction``: the plan, a track's attempt, the steps on one
file, the model stage, the dataset record, the provenance and the run's statistics.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterable, Iterator

from mess_ai import progress as progress_events
from mess_ai.audio import AudioSource, discover_audio, identity
from mess_ai.audio.decode_pool import DecodePool, NotTheSameFile, default_decode_workers, usable_cpus
from mess_ai.config import ExtractConfig
from mess_ai.deadline import Activity, StageTimeout
from mess_ai.errors import InputError
from mess_ai.extraction.dataset import describe_config_change, open_dataset, recorded_precision
from mess_ai.extraction.decoding import AudioBudget, DecodeAhead, OpenTrack, budget_seconds
from mess_ai.extraction.model_stage import ModelStage
from mess_ai.extraction.plan import Decision, FileState, Row, Selection, file_identity, plan_files, settled_outcome
from mess_ai.extraction.provenance import build_provenance
from mess_ai.extraction.stats import (
    FILE_CATEGORIES,
    STAGES,
    FileCounts,
    FileOutcome,
    ProgressCallback,
    RunStats,
    RunSummary,
)
from mess_ai.extraction.steps import (
    decode_track,
    file_states,
    header_duration,
    opened_or_error,
    plan_rows,
    track_job,
)
from mess_ai.extraction.track import (
    TIMEOUTS_BEFORE_GIVING_UP,
    UNFINISHED_BEFORE_GIVING_UP,
    TrackAttempt,
    fail_stuck,
)
from mess_ai.features.device import device_type, run_devices
from mess_ai.features.extractor import TrackJob, resolve_precision
from mess_ai.features.identity import model_identity
from mess_ai.features.loaded import LoadedModel
from mess_ai.features.loading import get_model
from mess_ai.gc_pause import gc_paused
from mess_ai.monitoring import ResourceMonitor
from mess_ai.store import DONE, FeatureStore
from mess_ai.store.integrity import IntegrityReport, check_dataset

__all__ = [
    "FILE_CATEGORIES", "STAGES", "TIMEOUTS_BEFORE_GIVING_UP", "UNFINISHED_BEFORE_GIVING_UP", "ExtractionSession",
    "FileCounts", "FileOutcome", "ProgressCallback", "RunSummary", "build_provenance", "chunk_sources",
    "describe_config_change", "file_identity", "run_extraction", "run_extraction_async",
]

log = logging.getLogger(__name__)


class ExtractionSession:
    """The stages of extraction for one dataset of a store and one config, shared by the CLI and the flows.

    Thread-safe where the flows need it: stages of different chunks may run in different threads. What the run
    did is tallied in ``stats``; each track worked on is a ``TrackAttempt``, which alone holds its lock; the model
    and the writing of features are the ``ModelStage``'s. Files are decoded by ``decode_workers`` processes of the
    session's (None: ``default_decode_workers`` for the device; 0: in this process), which ``close`` ends.
    """

    def __init__(self, store_root: str | Path, dataset: str, config: ExtractConfig | None = None, *,
                 manifest_url: str | None = None, progress: ProgressCallback | None = None,
                 model_loader: Callable[..., LoadedModel] = get_model,
                 monitor: ResourceMonitor | None = None, reextract: bool = False,
                 decode_workers: int | None = None) -> None:
        self.config = config or ExtractConfig()
        self.store = FeatureStore(store_root, dataset, manifest_url)
        self.reextract = reextract
        device = device_type(self.config.device)  # without torch on a host with no GPU
        # The precision actually used: with ``auto``, the dataset's own (never a silent re-extraction in another).
        self.precision = resolve_precision(self.config.precision, device, recorded_precision(self.store))
        # The weights, resolved once: the key, the provenance and the model loaded all name the same ones.
        self.identity = model_identity(self.config.model, self.config.revision)
        self.key = self.config.key(self.precision, self.identity["fingerprint"])
        self.stats = RunStats(monitor, progress or progress_events.emit)
        # What each thread is doing now, for the message of a stage that ran past its time limit.
        self.activity = Activity()
        self.model_stage = ModelStage(self.config, self.store, self.key, self.precision, self.identity,
                                      model_loader, self.stats, self.activity)
        self.durations: dict[str, float] = {}  # seconds of audio each valid file's header announces
        # Files whose last attempt never ended (the process died during it): each is extracted alone, so that
        # when one kills the process again, no other file's attempt dies with it (see ``isolate``).
        self.suspects: set[str] = set()
        self._lock = threading.Lock()
        self.decode_workers = (default_decode_workers(device, len(self.model_stage.devices), usable_cpus())
                               if decode_workers is None else decode_workers)
        self.budget = AudioBudget(budget_seconds(self.decode_workers))
        self._pool: DecodePool | None = None
        self._streams: list[DecodeAhead] = []

    def close(self) -> None:
        """Stop the decoding (tracks not extracted are given back), end the decoding processes, close the store."""
        try:
            with self._lock:
                streams, self._streams = self._streams, []
                pool, self._pool = self._pool, None
            for stream in streams:
                stream.close()
            if pool is not None:
                pool.close()
        finally:
            self.store.close()

    @property
    def outcomes(self) -> dict[str, FileOutcome]:
        """The outcome of each track settled so far, by track id (a retried chunk's latest)."""
        return self.stats.outcomes

    @property
    def discovered(self) -> int:
        return self.stats.discovered

    @property
    def devices(self) -> list[str]:
        """The devices the model work is spread over, one chunk at a time each ('cuda:0', 'cuda:1', or 'cpu')."""
        return self.model_stage.devices

    def counts(self) -> FileCounts:
        return self.stats.counts()

    def summary(self, audio_dir: str | Path, wall_seconds: float, integrity_problems: list[str]) -> RunSummary:
        return self.stats.summary(str(audio_dir), str(self.store.root), self.store.dataset, wall_seconds,
                                  integrity_problems, model_loaded=self.model_stage.loaded)

    # --- discover and plan --------------------------------------------------------------------------------
    def discover(self, audio_dir: str | Path) -> list[AudioSource]:
        audio_dir = Path(audio_dir)
        if not audio_dir.is_dir():
            raise FileNotFoundError(f"audio folder {audio_dir} does not exist or is not a folder")
        self.open_dataset(audio_dir)
        with self.stats.stage("discover"), gc_paused():
            sources = discover_audio(audio_dir)
            self.store.sweep_temp_files()
        self.stats.found(len(sources))
        return sources

    def open_dataset(self, audio_dir: str | Path) -> None:
        """Check that this run may write this dataset, and record what the dataset is on its first run (see
        ``mess_ai.extraction.dataset.open_dataset``)."""
        open_dataset(self.store, audio_dir, self.key, self.config.describe(self.precision, self.identity),
                     self.reextract)

    def plan(self, sources: list[AudioSource], only_failed: bool = False,
             files: Iterable[str] | None = None) -> list[AudioSource]:
        """The sources that need work; the others are recorded as previously failed, or counted as unchanged or
        not selected: with ``files`` (paths relative to the audio folder) those not named, with ``only_failed``
        those whose last attempt did not fail."""
        selection = Selection(only_failed, None if files is None else frozenset(files))
        with self.stats.stage("discover"), gc_paused():
            states = self._file_states(sources, selection, whole_dataset=True)
            decisions = plan_files(states, self.key, selection)
            for source, state, decision in zip(sources, states, decisions):
                self._apply(source, state.row, decision)
        pending = [source for source, decision in zip(sources, decisions) if decision.needs_work]
        self.stats.planned([source.track_id for source in pending], decisions.count(Decision.NOT_SELECTED),
                           decisions.count(Decision.UNCHANGED))
        self.stats.progress("plan", {"discovered": len(sources), "pending": len(pending)})
        return pending

    def _file_states(self, sources: list[AudioSource], selection: Selection, whole_dataset: bool = False
                     ) -> list[FileState]:
        rows = plan_rows(self.store, sources, selection, whole_dataset)
        return file_states(self.store, sources, rows, self.key, selection, self.config.keep_raw, self.activity)

    def _apply(self, source: AudioSource, row: Row | None, decision: Decision) -> None:
        if decision == Decision.UNCHANGED:
            return  # only counted (see ``RunStats.unchanged``)
        outcome = settled_outcome(source.track_id, source.relative, row, decision)
        if outcome is not None:
            self.stats.record(outcome, announce=False)
        elif decision == Decision.SUSPECT:
            with self._lock:
                self.suspects.add(source.track_id)

    def isolate(self, sources: list[AudioSource]) -> tuple[list[AudioSource], list[AudioSource]]:
        """(suspects, the others): the sources whose last attempt the process died in, to be extracted first and
        one at a time, with nothing else in flight, and the rest. A file that kills the process then counts its
        deaths alone, and the files that were in flight beside it before are not given up on with it."""
        suspects = [s for s in sources if s.track_id in self.suspects]
        if suspects:
            log.warning("%d files were being extracted when an earlier run's process died: extracting them one "
                        "at a time first (%s).", len(suspects), ", ".join(s.relative for s in suspects[:5]))
        return suspects, [s for s in sources if s.track_id not in self.suspects]

    def still_pending(self, sources: list[AudioSource]) -> list[AudioSource]:
        """The subset of ``sources`` not settled since planning (used when a chunk is retried)."""
        return [source for source, (_, needed) in zip(sources, self._recheck(sources)) if needed]

    def _recheck(self, sources: list[AudioSource]) -> list[tuple[FileState, bool]]:
        """Each source's state now (its manifest row read by key) and whether it still needs work: not settled
        since planning, by another run or by an earlier try of a retried chunk."""
        states = self._file_states(sources, Selection())
        return [(state, decision.needs_work) for state, decision in zip(states, plan_files(states, self.key))]

    # --- validate, preprocess ------------------------------------------------------------------------------
    def validate(self, sources: list[AudioSource]) -> list[AudioSource]:
        """Header checks; files that fail are recorded (an attempt each) and left out of the result.

        The durations the headers give are kept in ``durations`` (for chunking by audio length)."""
        if sources:
            # The model first: a checkpoint that cannot be used stops the run before any file is touched (no
            # failed row for a bad file of a run that could not have extracted the good ones either).
            self.model()
        valid = []
        with self.stats.stage("validate", files=len(sources)):
            for source in sources:
                try:
                    self.activity.set(f"reading the header of {source.relative}", source.track_id, "validate")
                    duration = header_duration(source, self.config)
                except (InputError, OSError) as exc:
                    error: BaseException = exc
                else:
                    with self._lock:
                        self.durations[source.track_id] = duration
                    valid.append(source)
                    continue
                self._reject(source, "validate", error)
        return valid

    def _reject(self, source: AudioSource, stage: str, error: BaseException) -> None:
        """Record ``error`` against a file found unusable before decoding: an attempt, with the hash of its bytes
        (which lets later runs skip the same bytes), failed."""
        with TrackAttempt.take(self.store, source, self.key, wait=True) as track:
            with opened_or_error(source, allow_empty=True) as (opened, open_error):
                track.begin(opened, open_error)
            self.stats.record(track.failed(stage, error))

    def decode_ahead(self, sources: list[AudioSource]) -> DecodeAhead:
        """The jobs of ``sources``, decoded from now on in the background (by the decoding processes, or by a thread
        of its own with none) and yielded in the order they finish, the audio in flight within ``budget``. Closing
        it (the model stage does, whatever stops it) gives back the tracks it did not hand out."""
        if sources:
            self.model()  # the sampling rate; and a model that cannot load stops the run before any file is taken
        with self._lock:
            if self.decode_workers and self._pool is None:
                log.info("Decoding in %d processes.", self.decode_workers)
                self._pool = DecodePool(self.decode_workers)
            stream = DecodeAhead(self, sources, self.durations, self.budget, in_workers=self._pool is not None)
            self._streams.append(stream)
        return stream

    def preprocess(self, sources: list[AudioSource]) -> Iterator[TrackJob]:
        """Decode, resample and window each source in the calling thread as its job is asked for, holding its track
        until ``extract`` writes it.

        A track another run holds right now is left to that run (outcome ``busy``): waiting for it while holding
        tracks of our own could deadlock two runs over the same files. Needs the model's sampling rate, so it
        loads the model (once per process) when there is a source.
        """
        if not sources:
            return
        self.model()
        for source in sources:
            track = self.open_track(source)
            if track is not None and (job := self.decode_here(track)) is not None:
                yield job

    def open_track(self, source: AudioSource) -> OpenTrack | None:
        """Take the track, and open and hash its file (its attempt begun): ready to decode. None when there is
        nothing to decode: busy (another run holds it), settled meanwhile, or failed to open (recorded)."""
        track = TrackAttempt.take(self.store, source, self.key, wait=False)
        if track is None:
            log.info("%s is being extracted by another run right now: leaving it to that run.", source.relative)
            self.stats.record(FileOutcome(source.track_id, source.relative, "busy",
                                          reason="another run is extracting it right now"))
            return None
        with track:  # given back here, unless handed over with its open file
            # Its row, read once now that it is held: for the check below and for the attempt's record.
            ((state, needed),) = self._recheck([source])
            row = state.row
            if not needed:  # finished by another run meanwhile, or by a retried chunk's earlier try
                track.give_back()
                status = "unchanged" if row and row["status"] == DONE else "previously_failed"
                self.stats.record(FileOutcome(source.track_id, source.relative, status), announce=False)
                return None
            self.activity.set(f"reading {source.relative}", source.track_id, "preprocess")
            files = contextlib.ExitStack()
            try:
                opened, error = files.enter_context(opened_or_error(source))
                error = track.begin(opened, error, row=row)
            except BaseException:
                files.close()
                raise
            if error is not None:
                files.close()
                self.stats.record(track.failed("preprocess", error))
                return None
            return OpenTrack(track.hand_over(), opened, files)

    def decode_here(self, open_track: OpenTrack) -> TrackJob | None:
        """Decode the open track in this process into its job for the model; None when it failed (recorded)."""
        track = open_track.track
        self.activity.set(f"reading and decoding {track.source.relative}", track.source.track_id, "preprocess")
        started = time.perf_counter()
        try:
            return decode_track(track, open_track.opened, self.model().sampling_rate, self.config)
        except Exception as exc:  # noqa: BLE001 - recorded; transient ones are retried
            self.stats.record(track.failed("preprocess", exc))
            return None
        finally:
            open_track.files.close()
            self.stats.add("preprocess", time.perf_counter() - started, 1, track.duration_seconds)

    def submit(self, open_track: OpenTrack) -> Future:
        """Hand the open track to a decoding process (it decodes it while it is the file hashed)."""
        return self._pool.decode(open_track.opened.path, identity(open_track.track.stat),
                                 self.model().sampling_rate, self.config.limits)

    def decoded_by_worker(self, open_track: OpenTrack, outcome: Future) -> TrackJob | None:
        """The job from what a decoding process made of the open track: its samples, its error (recorded as the
        same decoding in this process records it), or not the file hashed (decoded here, from the descriptor that
        was hashed, hashing again if it changed). None when it failed."""
        track = open_track.track
        try:
            decoded = outcome.result()
        except NotTheSameFile as changed:
            log.info("%s: %s; decoding it in the run's own process.", track.source.relative, changed.why)
            return self.decode_here(open_track)
        except Exception as exc:  # noqa: BLE001 - recorded; transient ones are retried
            open_track.files.close()
            self.stats.record(track.failed("preprocess", exc))
            return None
        open_track.files.close()
        started = time.perf_counter()
        try:
            return track_job(track, decoded.samples, self.model().sampling_rate, self.config)
        except Exception as exc:  # noqa: BLE001 - too short once decoded
            self.stats.record(track.failed("preprocess", exc))
            return None
        finally:
            self.stats.add("preprocess", decoded.seconds + time.perf_counter() - started, 1,
                           track.duration_seconds)

    def abandon(self, job: TrackJob) -> None:
        """Give back a prepared track that will not be extracted (its row stays pending: redone next run)."""
        job.context.give_back()

    # --- extract, write, integrity ------------------------------------------------------------------------------
    def model(self) -> LoadedModel:
        """The model, loaded on first use only (a run with nothing new never loads it)."""
        return self.model_stage.model()

    def extract(self, jobs: Iterable[TrackJob], slot: Callable[[], ContextManager] = contextlib.nullcontext
                ) -> list[FileOutcome]:
        """Run prepared tracks through the model and write them; model work happens inside ``slot()``.

        ``slot`` is where the flows take a GPU concurrency slot, so only model work holds one: jobs decoded ahead
        (``decode_ahead``) give it up while they wait for the next decoded file. Every track it was handed is given
        back, whatever stops it (see ``ModelStage.extract``).
        """
        return self.model_stage.extract(jobs, slot)

    def record_timeout(self, timeout: StageTimeout, source: AudioSource) -> FileOutcome:
        """Record ``source``, the file a stage was stuck on, as failed with the time-out as the reason; its lock
        stays with the stuck thread (see ``mess_ai.extraction.track.fail_stuck``)."""
        return self.stats.record(fail_stuck(self.store, source, self.key, timeout))

    def check(self) -> IntegrityReport:
        """Structural integrity of the tracks this run extracted or recorded as failed (their files and shapes,
        files of theirs without a row, their temporary files), and of the dataset's provenance and config mix. The
        tracks done before are ``mess-ai check``'s (``check_store``): a run's cost does not grow with them."""
        settled = [track_id for track_id, outcome in self.outcomes.items() if outcome.status in ("done", "failed")]
        with self.stats.stage("integrity"):
            if settled:
                # Temporary files left by a run killed since this run's start: swept once here (one listing of each
                # scale folder), not when each track is taken (a listing per track, as long as the dataset).
                self.store.sweep_temp_files()
            tracks = f"the {len(settled)} track{'' if len(settled) == 1 else 's'} this run extracted or failed"
            report = IntegrityReport(scope=tracks)
            self.activity.set(f"checking {tracks}")
            check_dataset(self.store, report, check_values=False, track_ids=settled)
        return report


def chunk_sources(sources: list[AudioSource], files_per_chunk: int, seconds_per_chunk: float | None = None,
                  durations: dict[str, float] | None = None) -> list[list[AudioSource]]:
    """Split sources into chunks of at most ``files_per_chunk`` files and, when given, about
    ``seconds_per_chunk`` of audio (a single longer file makes a chunk of its own)."""
    if files_per_chunk < 1:
        raise ValueError(f"files per chunk must be at least 1, got {files_per_chunk}")
    if seconds_per_chunk is not None and seconds_per_chunk <= 0:
        raise ValueError(f"seconds per chunk must be positive, got {seconds_per_chunk}")
    chunks: list[list[AudioSource]] = []
    current: list[AudioSource] = []
    seconds = 0.0
    for source in sources:
        length = (durations or {}).get(source.track_id, 0.0)
        full = len(current) >= files_per_chunk or (
            seconds_per_chunk is not None and current and seconds + length > seconds_per_chunk)
        if full:
            chunks.append(current)
            current, seconds = [], 0.0
        current.append(source)
        seconds += length
    if current:
        chunks.append(current)
    return chunks


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
    reextract: bool = False,
    decode_workers: int | None = None,
) -> RunSummary:
    """Extract features for every new or changed audio file under ``audio_dir`` into ``store_root``, in plain
    Python (no Prefect).

    ``dataset`` defaults to the audio folder's name. ``only_failed`` re-runs just the files whose last attempt
    failed. ``reextract`` lets a run with another config than the dataset's replace its features (else refused).
    ``decode_workers``: processes decoding ahead of the model (None: ``default_decode_workers`` for the device).
    Raises ``FileNotFoundError`` for a missing folder, ``ModelError`` when the model cannot be loaded,
    ``DatasetMismatchError`` when the dataset holds another folder's recordings or another config's features
    (without ``reextract``), and ``StoreError`` when the store cannot be used; a bad audio file never raises,
    it is recorded.
    """
    wall_started = time.perf_counter()
    config = config or ExtractConfig()
    audio_dir = Path(audio_dir)
    monitor = ResourceMonitor(run_devices(config.device))
    session = ExtractionSession(store_root, dataset or audio_dir.absolute().name, config,
                                manifest_url=manifest_url, progress=progress, model_loader=model_loader,
                                monitor=monitor, reextract=reextract, decode_workers=decode_workers)
    try:
        with monitor:
            sources = session.discover(audio_dir)
            pending = session.plan(sources, only_failed)
            log.info("Found %d audio files in %s: %d to extract (%s).", len(sources), audio_dir, len(pending),
                     session.counts().describe(finished=False))
            valid = session.validate(pending)
            suspects, others = session.isolate(valid)
            for suspect in suspects:  # alone: nothing else in flight
                session.extract(session.decode_ahead([suspect]))
            if others:
                _extract_on_every_device(session, others)
            report = session.check()
            (log.info if report.ok else log.error)(report.describe())
        summary = session.summary(audio_dir, time.perf_counter() - wall_started, report.lines())
    finally:
        session.close()
    log.info("Done: %s, in %.1f s.", summary.counts.describe(), summary.wall_seconds)
    return summary


def _extract_on_every_device(session: ExtractionSession, sources: list[AudioSource]) -> None:
    """Decode ``sources`` ahead of the model and run them through it: one stream of files per device of the
    session, the files dealt out among them, each stream in a thread of its own."""
    def stream(part: list[AudioSource]) -> None:
        session.extract(session.decode_ahead(part))

    streams = min(len(session.devices), len(sources))
    if streams <= 1:
        stream(sources)
        return
    # Every stream runs to its end; the first error of one is raised here once all have ended.
    with ThreadPoolExecutor(streams, thread_name_prefix="mess-ai-stream") as pool:
        list(pool.map(stream, [sources[i::streams] for i in range(streams)]))


async def run_extraction_async(audio_dir: str | Path, store_root: str | Path, **kwargs: Any) -> RunSummary:
    """``run_extraction`` off the event loop (for async callers such as a web backend)."""
    return await asyncio.to_thread(run_extraction, audio_dir, store_root, **kwargs)
