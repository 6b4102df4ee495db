"""The extraction pipeline: discover → validate → preprocess → extract → write → integrity.

``ExtractionSession`` holds the stages for one dataset of a store and one config; ``run_extraction`` runs them
in plain Python, and the Prefect flow (``flows/extract.py``) runs the same stages as tasks over chunks of files.
A bad file is recorded in the manifest with its stage and reason, and the run goes on. Unchanged files are
skipped without loading the model. Every output is written atomically, and a track is marked done only once all
its files are in place.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import platform
import queue
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterable, Iterator

import numpy as np

import mess_ai
from mess_ai import progress as progress_events
from mess_ai.audio import AudioSource, WindowSpec, discover_audio, load_mono, probe_audio, window_bounds
from mess_ai.audio.opening import OpenedAudio, identity, open_audio, sha256_fd
from mess_ai.audio.validation import AudioLimits
from mess_ai.deadline import Activity, StageTimeout
from mess_ai.errors import DatasetMismatchError, InputError, MessError, ModelError, TrackBusyError
from mess_ai.features.extractor import Extractor, TrackJob, precision_problem, resolve_precision
from mess_ai.features.model import DEFAULT_MODEL, LoadedModel, get_model, model_identity, resolve_device
from mess_ai.monitoring import ResourceMonitor
from mess_ai.store import DONE, FAILED, PENDING, ExpectedShapes, FeatureStore
from mess_ai.store.manifest import unfinished_before
from mess_ai.store.integrity import IntegrityReport, check_dataset
from mess_ai.store.keys import FEATURE_FORMAT_VERSION, config_key

log = logging.getLogger(__name__)

STAGES = ("discover", "validate", "preprocess", "extract", "write", "integrity")
# Attempts that ended in a time-out before a file counts as failed for good (until its bytes change).
TIMEOUTS_BEFORE_GIVING_UP = 3
# Attempts during which the process died (killed by the kernel for memory, a crash in a decoder) before a file
# counts as failed for good (until its bytes change): one file cannot kill every night.
UNFINISHED_BEFORE_GIVING_UP = 3


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
    # Sampling-rate range and maximum duration of a file: checked on the header before decoding, and while
    # decoding (memory per file is bounded by them, whatever a header claims). Not part of the content key.
    limits: AudioLimits = field(default_factory=AudioLimits)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def key(self, precision: str | None = None, fingerprint: str | None = None) -> str:
        """The content key of this config: same key, same features (batch size and raw do not change them).

        What changes the numbers: the weights actually loaded (``fingerprint``: ``model_identity``'s, by default
        resolved now: a local folder by the hash of its files, a hub id by the commit its revision stands for),
        the windowing, and ``precision``, the precision actually used (``auto`` resolved, see
        ``resolve_precision``; default: this config's own on its device)."""
        precision = precision or resolve_precision(self.precision, resolve_device(self.device))
        fingerprint = fingerprint or model_identity(self.model, self.revision)["fingerprint"]
        return config_key({"model": fingerprint, "window": self.window.to_dict(), "precision": precision})

    def describe(self, precision: str, identity: dict[str, Any] | None = None) -> dict[str, Any]:
        """What makes the numbers, in words a person can compare: recorded for each config a dataset has had."""
        identity = identity or model_identity(self.model, self.revision)
        return {"model": self.model, "revision": self.revision, "resolved_revision": identity["resolved_revision"],
                "model_fingerprint": identity["fingerprint"],
                "window_seconds": self.window.window_seconds, "hop_seconds": self.window.hop_seconds,
                "min_duration_seconds": self.window.min_duration_seconds, "precision": precision}


def describe_config_change(old: dict[str, Any], new: dict[str, Any]) -> str:
    """'window 5.0 s -> 10.0 s, precision bf16 -> fp32': what differs between two ``ExtractConfig.describe``."""
    if not old:
        return "a config recorded before mess-ai kept dataset configs"
    names = {"model_fingerprint": "model weights", "window_seconds": "window", "hop_seconds": "hop",
             "min_duration_seconds": "minimum duration", "precision": "precision", "model": "model"}
    units = {"window_seconds": " s", "hop_seconds": " s", "min_duration_seconds": " s"}
    changes = [f"{label} {old.get(name)}{units.get(name, '')} -> {new.get(name)}{units.get(name, '')}"
               for name, label in names.items() if old.get(name) != new.get(name)]
    return ", ".join(changes) or "the same settings (another content key: the key's format changed)"


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
    outcomes: list[FileOutcome] = field(default_factory=list)
    integrity_problems: list[str] = field(default_factory=list)
    resources: dict[str, Any] = field(default_factory=dict)
    model_work: list[tuple[float, float]] = field(default_factory=list)

    @property
    def real_time_factor(self) -> float | None:
        """Audio seconds extracted per wall-clock second (None when nothing was extracted)."""
        return self.audio_seconds / self.wall_seconds if self.audio_seconds and self.wall_seconds else None

    @property
    def counts(self) -> FileCounts:
        """What became of every file found (the numbers every report shows)."""
        return FileCounts(**{f.name: getattr(self, f.name) for f in dataclasses.fields(FileCounts)})

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
    released: bool = False
    stat: Any = None  # the file's os.stat_result when it was hashed
    settled: bool = False  # its outcome (done or failed) is in the manifest
    end_attempt: Callable[[], None] | None = None  # says the attempt was given back, not died in

    def release(self) -> None:
        """Close what is open and give the track back to other runs; once, whatever fails on the way. A track
        given back without an outcome (the run stopped in order) is recorded as such: only attempts the process
        died in count towards giving up on a file."""
        if self.released:
            return
        self.released = True
        try:
            self.resources.close()  # an unfinished raw file: its temporary file is removed
            if not self.settled and self.end_attempt is not None:
                self.end_attempt()
        finally:
            self.lock.release()


_DECODE_TRIES = 3


def file_identity(stat: os.stat_result) -> str:
    """'<inode>:<ctime_ns>': with size and mtime, what says a file still holds the bytes hashed earlier. A copy
    that keeps size and mtime (``cp -p``, ``rsync -t``) is a new inode, or at least a new change time, which no
    tool can set back. (Not the device: a network mount has another on each machine sharing a manifest.)"""
    return f"{stat.st_ino}:{stat.st_ctime_ns}"


def _versions() -> dict[str, str]:
    import soundfile
    import soxr
    import torch
    import transformers

    return {"mess_ai": mess_ai.__version__, "python": platform.python_version(), "numpy": np.__version__,
            "torch": torch.__version__, "transformers": transformers.__version__,
            "soundfile": soundfile.__version__, "libsndfile": soundfile.__libsndfile_version__,
            "soxr": soxr.__version__}


def build_provenance(config: ExtractConfig, model: LoadedModel, key: str, precision: str | None = None,
                     identity: dict[str, Any] | None = None) -> dict[str, Any]:
    identity = identity or model_identity(config.model, config.revision)
    return {
        "config_key": key,
        "feature_format_version": FEATURE_FORMAT_VERSION,
        "model": config.model,
        "revision": config.revision,
        "resolved_revision": identity["resolved_revision"],
        "model_fingerprint": identity["fingerprint"],
        "weights_sha256": identity["weights_sha256"],
        "sampling_rate": model.sampling_rate,
        "do_normalize": model.do_normalize,
        "window_seconds": config.window.window_seconds,
        "hop_seconds": config.window.hop_seconds,
        "min_duration_seconds": config.window.min_duration_seconds,
        "num_hidden_states": model.num_hidden_states,
        "hidden_size": model.hidden_size,
        "layers": list(range(model.num_hidden_states)),
        "precision": precision or resolve_precision(config.precision, model.device),
        "scales": {
            "aggregated": "float32 [n_hidden_states, hidden_size]: mean over all windows and frames",
            "segments": "float32 [n_windows, n_hidden_states, hidden_size]: mean over each window's frames",
            "raw": "float16 [n_windows, n_hidden_states, frames, hidden_size] (only with keep_raw)",
        },
        "versions": _versions(),
    }


def prefetch(items: Iterator[TrackJob], depth: int, on_abandon: Callable[[TrackJob], None]) -> Iterator[TrackJob]:
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


class ExtractionSession:
    """The stages of extraction for one dataset of a store and one config, shared by the CLI and the flows.

    Thread-safe where the flows need it: stages of different chunks may run in different threads. Outcomes are
    kept per track, the latest attempt winning, so a retried chunk replaces what its failed attempt recorded.
    """

    def __init__(self, store_root: str | Path, dataset: str, config: ExtractConfig | None = None, *,
                 manifest_url: str | None = None, progress: ProgressCallback | None = None,
                 model_loader: Callable[..., LoadedModel] = get_model,
                 monitor: ResourceMonitor | None = None, reextract: bool = False) -> None:
        self.config = config or ExtractConfig()
        self.store = FeatureStore(store_root, dataset, manifest_url)
        self.reextract = reextract
        self.record = self.store.manifest.dataset_record(self.store.dataset)
        recorded = self.record["configs"].get(self.record["config_key"], {}) if self.record else {}
        dataset_precision = recorded.get("precision") or (self.store.read_provenance() or {}).get("precision")
        # The precision actually used: with ``auto``, the dataset's own (never a silent re-extraction in another).
        self.precision = resolve_precision(self.config.precision, resolve_device(self.config.device),
                                           dataset_precision)
        # The weights, resolved once: the key, the provenance and the model loaded all name the same ones.
        self.identity = model_identity(self.config.model, self.config.revision)
        self.key = self.config.key(self.precision, self.identity["fingerprint"])
        self.progress = progress or progress_events.emit
        self.durations: dict[str, float] = {}
        self.model_loader = model_loader
        self.monitor = monitor
        # What each thread is doing now, for the message of a stage that ran past its time limit.
        self.activity = Activity()
        self.stage_seconds = {s: 0.0 for s in STAGES}
        self.stage_files = {s: 0 for s in STAGES}
        self.stage_audio_seconds = {s: 0.0 for s in STAGES}
        self.outcomes: dict[str, FileOutcome] = {}
        self.model_work: list[tuple[float, float]] = []
        self.discovered = 0
        self.not_selected = 0
        self.selected: set[str] = set()  # track ids of the files chosen for work by ``plan``
        # Files whose last attempt never ended (the process died during it): each is extracted alone, so that
        # when one kills the process again, no other file's attempt dies with it (see ``isolate``).
        self.suspects: set[str] = set()
        self._model: LoadedModel | None = None
        self._extractor: Extractor | None = None
        self._lock = threading.RLock()

    def close(self) -> None:
        self.store.close()

    # --- bookkeeping -------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _stage(self, stage: str, files: int = 0, audio_seconds: float = 0.0) -> Iterator[None]:
        started = time.perf_counter()
        with self.monitor.stage(stage) if self.monitor else contextlib.nullcontext():
            try:
                yield
            finally:
                with self._lock:
                    self.stage_seconds[stage] += time.perf_counter() - started
                    self.stage_files[stage] += files
                    self.stage_audio_seconds[stage] += audio_seconds

    def _record(self, outcome: FileOutcome, announce: bool = True) -> None:
        with self._lock:
            self.outcomes[outcome.track_id] = outcome
        if announce:
            self.progress("file", dataclasses.asdict(outcome))

    def counts(self) -> FileCounts:
        """What became of every file found so far: each outcome's status, the files ``plan`` did not select, and
        the selected ones without an outcome (still to do; left for the next run once the run has stopped)."""
        with self._lock:
            statuses = [o.status for o in self.outcomes.values()]
            return FileCounts(
                discovered=self.discovered, done=statuses.count("done"), failed=statuses.count("failed"),
                unchanged=statuses.count("unchanged"), previously_failed=statuses.count("previously_failed"),
                busy=statuses.count("busy"), not_selected=self.not_selected,
                left=sum(track_id not in self.outcomes for track_id in self.selected))

    def summary(self, audio_dir: str | Path, wall_seconds: float, integrity_problems: list[str]) -> RunSummary:
        with self._lock:
            outcomes = sorted(self.outcomes.values(), key=lambda o: o.relative_path)
            return RunSummary(
                audio_dir=str(audio_dir), store=str(self.store.root), dataset=self.store.dataset,
                **dataclasses.asdict(self.counts()),
                audio_seconds=sum(o.duration_seconds or 0.0 for o in outcomes if o.status == "done"),
                wall_seconds=wall_seconds, model_loaded=self._model is not None,
                stage_seconds=dict(self.stage_seconds), stage_files=dict(self.stage_files),
                stage_audio_seconds=dict(self.stage_audio_seconds), outcomes=outcomes,
                integrity_problems=integrity_problems,
                resources=self.monitor.report.to_dict() if self.monitor and self.monitor.report else {},
                model_work=list(self.model_work))

    # --- discover and plan --------------------------------------------------------------------------------
    def discover(self, audio_dir: str | Path) -> list[AudioSource]:
        audio_dir = Path(audio_dir)
        if not audio_dir.is_dir():
            raise FileNotFoundError(f"audio folder {audio_dir} does not exist or is not a folder")
        self.open_dataset(audio_dir)
        with self._stage("discover"):
            sources = discover_audio(audio_dir)
            self.store.sweep_temp_files()
        with self._lock:
            self.discovered = len(sources)
            self.stage_files["discover"] += len(sources)
        return sources

    def open_dataset(self, audio_dir: str | Path) -> None:
        """Check that this run may write this dataset, and record what the dataset is on its first run.

        A dataset holds the recordings of one audio folder, extracted with one config: a run from another folder
        (``2023/audio`` and ``2024/audio`` both default to the dataset ``audio``) would overwrite the features of
        the files both folders name alike, and a run with another config would silently re-extract everything (or,
        stopped half-way, leave a mix). Both raise ``DatasetMismatchError``, unless ``reextract`` asks for the new
        config: then the dataset's config changes, and its tracks are re-extracted as the run reaches them (their
        old features are kept until new ones replace them; until the last one has, the dataset is mixed).
        A dataset of an earlier mess-ai, with no record yet, is recorded from its manifest rows and this run."""
        folder = os.path.realpath(audio_dir)
        description = self.config.describe(self.precision, self.identity)
        record = self.store.manifest.dataset_record(self.store.dataset)
        if record is None:
            recorded_folder = self._folder_of_rows()
            if recorded_folder is not None and recorded_folder != folder:
                raise self._other_folder(recorded_folder, folder)
            if self.store.manifest.create_dataset_record(self.store.dataset, audio_dir=folder, config_key=self.key,
                                                         configs={self.key: description}):
                self.record = self.store.manifest.dataset_record(self.store.dataset)
                stale = {key: n for key, n in self.store.manifest.feature_configs(self.store.dataset).items()
                         if key != self.key}
                if stale:
                    log.warning("Dataset '%s' was extracted by an earlier mess-ai, whose content keys named the "
                                "weights differently: its %d tracks are extracted again by this run (once).",
                                self.store.dataset, sum(stale.values()))
                return
            record = self.store.manifest.dataset_record(self.store.dataset)  # created by a run at the same moment
        if record["audio_dir"] != folder:
            raise self._other_folder(record["audio_dir"], folder)
        if record["config_key"] != self.key:
            change = describe_config_change(record["configs"].get(record["config_key"], {}), description)
            if not self.reextract:
                raise DatasetMismatchError(
                    f"dataset '{self.store.dataset}' of store {self.store.root} holds features extracted with "
                    f"another config than this run's ({change}). To keep both, extract into another dataset: "
                    f"--dataset NAME (flow parameter 'dataset'); to replace its features with this config's, "
                    f"ask for it: --reextract (flow parameter 'reextract'). Nothing was changed.")
            log.warning("Re-extracting dataset '%s' with a new config (%s): its tracks are redone as the run "
                        "reaches them; their old features stay until new ones replace them, and until every track "
                        "is redone `mess-ai check` reports the dataset as mixed and the analysis refuses it.",
                        self.store.dataset, change)
            self.store.manifest.update_dataset_record(self.store.dataset, config_key=self.key,
                                                      configs={**record["configs"], self.key: description})
        self.record = self.store.manifest.dataset_record(self.store.dataset)

    def _other_folder(self, recorded: str, folder: str) -> DatasetMismatchError:
        suggestion = re.sub(r"[^A-Za-z0-9._-]+", "_", "-".join(Path(folder).parts[-2:])).lstrip(".-_")[:100]
        return DatasetMismatchError(
            f"dataset '{self.store.dataset}' of store {self.store.root} holds the recordings of {recorded}; this "
            f"run reads {folder}. Two folders cannot share a dataset (files named alike would overwrite each "
            f"other's features): name this folder's dataset, e.g. --dataset {suggestion or 'NAME'} "
            f"(flow parameter 'dataset'). Nothing was changed.")

    def _folder_of_rows(self) -> str | None:
        """The audio folder a dataset of an earlier mess-ai (no record) was extracted from: its rows' source paths
        without their relative paths (the most common one), or None for a dataset without rows."""
        folders: dict[str, int] = {}
        for row in self.store.manifest.rows(self.store.dataset):
            source, relative = row["source_path"], row["relative_path"]
            if source.endswith(relative):
                folder = os.path.realpath(source[: len(source) - len(relative)].rstrip("/") or "/")
                folders[folder] = folders.get(folder, 0) + 1
        return max(folders, key=folders.__getitem__) if folders else None

    @staticmethod
    def _content_hash(source: AudioSource, row: dict[str, Any] | None, opened: OpenedAudio | None = None) -> str:
        """sha256 of the file's bytes, reused from the manifest while size, mtime and identity are unchanged; read from
        ``opened`` when given, else from the file opened the safe way (a FIFO raises at once, never blocks)."""
        stat = opened.stat if opened is not None else source.path.stat()
        if row is not None and row["sha256"] and row["size"] == stat.st_size and row["mtime_ns"] == stat.st_mtime_ns \
                and row.get("file_identity") in (None, file_identity(stat)):  # None: a row of an earlier version
            return row["sha256"]
        if opened is not None:
            return sha256_fd(opened.fd)
        with open_audio(source.path, allow_empty=True) as fresh:
            return sha256_fd(fresh.fd)

    def _settled(self, source: AudioSource, row: dict[str, Any] | None, provenance: dict[str, Any]) -> str | None:
        """'unchanged' or 'previously_failed' when the file needs no work now, else None."""
        if row is None or row["config_key"] != self.key or row["status"] not in (DONE, FAILED):
            return None
        try:
            sha = self._content_hash(source, row)
        except (OSError, InputError):
            return None  # unreadable now, or not a regular file: the attempt records why
        if sha != row["sha256"]:
            return None
        if row["status"] == DONE and provenance.get("config_key") == self.key and self.store.outputs_valid(
                source.track_id, ExpectedShapes(row["n_windows"], provenance["num_hidden_states"],
                                                provenance["hidden_size"]), self.config.keep_raw):
            return "unchanged"
        if row["status"] == FAILED and row["permanent"]:
            return "previously_failed"
        return None

    def plan(self, sources: list[AudioSource], only_failed: bool = False,
             files: Iterable[str] | None = None) -> list[AudioSource]:
        """The sources that need work; the others are recorded as unchanged or previously failed, or counted as
        not selected: with ``files`` (paths relative to the audio folder) those not named, with ``only_failed``
        those whose last attempt did not fail."""
        wanted = None if files is None else set(files)
        with self._stage("discover"):
            rows = self.store.manifest.rows_by_track(self.store.dataset)
            provenance = self.store.read_provenance() or {}
            pending = []
            not_selected = 0
            for source in sources:
                row = rows.get(source.track_id)
                if wanted is not None and source.relative not in wanted:
                    not_selected += 1
                    continue
                if only_failed:
                    if row is not None and row["status"] == FAILED:
                        pending.append(source)
                    else:
                        not_selected += 1
                    continue
                self.activity.set(f"checking whether {source.relative} changed")
                settled = self._settled(source, row, provenance)
                if settled is None:
                    pending.append(source)
                    if row is not None and row["status"] == PENDING and (row.get("unfinished") or 0) > 0:
                        with self._lock:
                            self.suspects.add(source.track_id)
                elif settled == "unchanged":
                    self._record(FileOutcome(source.track_id, source.relative, "unchanged"), announce=False)
                else:
                    self._record(FileOutcome(
                        source.track_id, source.relative, "previously_failed", row["failure_stage"],
                        row["error_class"], row["error_message"], row["attempts"], row["duration_seconds"],
                        permanent=True), announce=False)
        with self._lock:
            self.not_selected += not_selected
            self.selected.update(source.track_id for source in pending)
        self.progress("plan", {"discovered": len(sources), "pending": len(pending)})
        return pending

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
        rows = self.store.manifest.rows_by_track(self.store.dataset)
        provenance = self.store.read_provenance() or {}
        return [s for s in sources if self._settled(s, rows.get(s.track_id), provenance) is None]

    # --- validate, preprocess ------------------------------------------------------------------------------
    def _lock_track(self, source: AudioSource, wait: bool) -> Any | None:
        lock = self.store.lock(source.track_id)
        try:
            lock.acquire(blocking=wait)
        except TrackBusyError:
            return None
        return lock

    def _begin(self, source: AudioSource, lock: Any, opened: OpenedAudio | None = None,
               error: BaseException | None = None) -> tuple[_Track, BaseException | None]:
        """Record an attempt on ``source`` (whose lock is held), with the hash of the bytes ``opened`` holds (the
        file opened once, the safe way, by the caller: ``error`` when that failed). Returns the track and what
        stops the attempt before it starts: that error, a hash that cannot be read, or a poison file (the
        process died during its last ``UNFINISHED_BEFORE_GIVING_UP`` attempts)."""
        row = self.store.manifest.get(self.store.dataset, source.track_id)
        stat, sha = None, None
        if opened is not None and error is None:
            try:
                stat = opened.stat  # before hashing: a change during the hash shows after decoding
                sha = self._content_hash(source, row, opened)
            except OSError as exc:
                stat, sha, error = None, None, exc
        died = unfinished_before(row, sha, self.key)
        attempts = self.store.manifest.begin_attempt(
            self.store.dataset, source.track_id, source_path=str(source.path), relative_path=source.relative,
            size=stat.st_size if stat else None, mtime_ns=stat.st_mtime_ns if stat else None, sha256=sha,
            config_key=self.key, file_identity=file_identity(stat) if stat else None)
        for temp in self.store.temp_files(source.track_id):
            temp.unlink(missing_ok=True)  # left by a killed run; we hold the lock now
        dataset, track_id = self.store.dataset, source.track_id
        track = _Track(source, lock, attempts, time.perf_counter(), stat=stat,
                       end_attempt=lambda: self.store.manifest.end_attempt(dataset, track_id))
        if error is None and died >= UNFINISHED_BEFORE_GIVING_UP:
            error = InputError(source.path, f"the process ended {died} times while extracting this file (killed, "
                                            "e.g. for memory, or crashed) without recording an outcome: given up "
                                            "on, not retried until the file changes", "preprocess")
        return track, error

    def _begin_opening(self, source: AudioSource, lock: Any) -> tuple[_Track, BaseException | None]:
        """``_begin`` on the file opened here, and closed again once hashed (for a file found unusable before
        decoding: its hash lets later runs skip the same bytes)."""
        files = contextlib.ExitStack()
        try:
            opened = files.enter_context(open_audio(source.path, allow_empty=True))
        except (OSError, InputError) as exc:
            return self._begin(source, lock, None, exc)
        with files:
            return self._begin(source, lock, opened)

    def _fail(self, track: _Track, stage: str, exc: BaseException) -> None:
        permanent = isinstance(exc, InputError)
        reason = exc.reason if isinstance(exc, InputError) else (str(exc) or type(exc).__name__)
        seconds = time.perf_counter() - track.started
        try:
            track.resources.close()
            # The track's features of an earlier extraction, if any, stay: only new complete ones replace them.
            track.settled = True
            self.store.manifest.mark_failed(self.store.dataset, track.source.track_id, stage=stage,
                                            error_class=type(exc).__name__, message=reason, permanent=permanent,
                                            seconds_spent=seconds, duration_seconds=track.duration_seconds or None)
        finally:
            track.release()  # even when the manifest cannot be written: the run stops, the lock must not stay
        log.warning("%s failed at %s: %s (attempt %d%s)", track.source.relative, stage, reason, track.attempts,
                    "" if permanent else ", will be retried")
        self._record(FileOutcome(track.source.track_id, track.source.relative, "failed", stage,
                                 type(exc).__name__, reason, track.attempts, track.duration_seconds or None,
                                 seconds, permanent))

    def record_timeout(self, timeout: StageTimeout, source: AudioSource) -> FileOutcome:
        """Record ``source``, the file a stage was stuck on, as failed with the time-out as the reason.

        Its thread is still stuck and holds the track's lock, so the lock is left alone: the run stops and its
        process ends, and the next run takes over the lock of a dead process. Retried on the next runs, like any
        I/O trouble; a file whose decoding hung ``TIMEOUTS_BEFORE_GIVING_UP`` times (same bytes) is a permanent
        failure until it changes, so one file cannot stop every night.
        """
        stage = timeout.stage or "preprocess"
        row = self.store.manifest.get(self.store.dataset, source.track_id)
        if row is not None and row["status"] == PENDING and row["config_key"] == self.key:
            attempts = row["attempts"]  # its attempt was recorded (with its bytes' hash) before it got stuck
        else:  # stuck before that, e.g. reading the bytes to hash them: an attempt of unknown bytes
            attempts = self.store.manifest.begin_attempt(
                self.store.dataset, source.track_id, source_path=str(source.path), relative_path=source.relative,
                size=None, mtime_ns=None, sha256=None, config_key=self.key)
        permanent = attempts >= TIMEOUTS_BEFORE_GIVING_UP
        reason = (f"timed out: {timeout.what} was stuck {timeout.doing} for {timeout.seconds:.0f} s (attempt "
                  f"{attempts}; " + ("not retried until the file changes)" if permanent else "retried next run)"))
        self.store.manifest.mark_failed(self.store.dataset, source.track_id, stage=stage,
                                        error_class="StageTimeout", message=reason, permanent=permanent,
                                        seconds_spent=timeout.seconds, duration_seconds=None)
        log.warning("%s failed at %s: %s", source.relative, stage, reason)
        outcome = FileOutcome(source.track_id, source.relative, "failed", stage, "StageTimeout", reason, attempts,
                              permanent=permanent)
        self._record(outcome)
        return outcome

    def validate(self, sources: list[AudioSource]) -> list[AudioSource]:
        """Header checks; files that fail are recorded (an attempt each) and left out of the result.

        The durations the headers give are kept in ``durations`` (for chunking by audio length)."""
        if sources:
            # The model first: a checkpoint that cannot be used stops the run before any file is touched (no
            # failed row for a bad file of a run that could not have extracted the good ones either).
            self.model()
        valid = []
        with self._stage("validate", files=len(sources)):
            for source in sources:
                try:
                    self.activity.set(f"reading the header of {source.relative}", source.track_id, "validate")
                    info = probe_audio(source.path, self.config.window.min_duration_seconds, self.config.limits)
                except InputError as exc:
                    error: BaseException = exc
                except OSError as exc:
                    error = exc
                else:
                    with self._lock:
                        self.durations[source.track_id] = info.duration_seconds
                    valid.append(source)
                    continue
                track, _ = self._begin_opening(source, self._lock_track(source, wait=True))
                self._fail(track, "validate", error)
        return valid

    def preprocess(self, sources: list[AudioSource]) -> Iterator[TrackJob]:
        """Decode, resample and window each source, holding its lock until ``extract`` writes it.

        A track another run holds right now is left to that run (outcome ``busy``): waiting for it while holding
        tracks of our own could deadlock two runs over the same files. Needs the model's sampling rate, so it
        loads the model (once per process) when there is a source.
        """
        if not sources:
            return
        model = self.model()
        for source in sources:
            lock = self._lock_track(source, wait=False)
            if lock is None:
                log.info("%s is being extracted by another run right now: leaving it to that run.", source.relative)
                self._record(FileOutcome(source.track_id, source.relative, "busy",
                                         reason="another run is extracting it right now"))
                continue
            job = self._preprocess_one(source, lock, model.sampling_rate)
            if job is not None:
                yield job

    def _preprocess_one(self, source: AudioSource, lock: Any, sampling_rate: int) -> TrackJob | None:
        if not self.still_pending([source]):  # finished by another run while we waited, or by a retry
            lock.release()
            row = self.store.manifest.get(self.store.dataset, source.track_id)
            status = "unchanged" if row and row["status"] == DONE else "previously_failed"
            self._record(FileOutcome(source.track_id, source.relative, status), announce=False)
            return None
        self.activity.set(f"reading and decoding {source.relative}", source.track_id, "preprocess")
        with contextlib.ExitStack() as files:
            # Opened once (not following links, never waiting on a FIFO), then hashed and decoded from that
            # descriptor: the bytes hashed are the bytes decoded.
            try:
                opened, error = files.enter_context(open_audio(source.path)), None
            except (OSError, InputError) as exc:
                opened, error = None, exc
            track, error = self._begin(source, lock, opened, error)
            if error is not None:
                self._fail(track, "preprocess", error)
                return None
            return self._decode_track(track, opened, sampling_rate)

    def _decode_track(self, track: _Track, opened: OpenedAudio, sampling_rate: int) -> TrackJob | None:
        source = track.source
        started = time.perf_counter()
        try:
            signal = self._decode_unchanged(track, opened, sampling_rate)
            track.duration_seconds = len(signal) / sampling_rate
            bounds = window_bounds(len(signal), sampling_rate, self.config.window)
        except InputError as exc:
            self._fail(track, "preprocess", exc)
            return None
        except ValueError as exc:  # window_bounds: decoded audio shorter than the minimum
            self._fail(track, "preprocess", InputError(source.path, str(exc), "preprocess"))
            return None
        except Exception as exc:  # noqa: BLE001 - recorded; transient ones are retried
            self._fail(track, "preprocess", exc)
            return None
        finally:
            with self._lock:
                self.stage_seconds["preprocess"] += time.perf_counter() - started
                self.stage_files["preprocess"] += 1
                self.stage_audio_seconds["preprocess"] += track.duration_seconds
        return TrackJob(source.track_id, signal, bounds, context=track)

    def _decode_unchanged(self, track: _Track, opened: OpenedAudio, sampling_rate: int) -> np.ndarray:
        """Decode the opened file, making sure the bytes decoded are the bytes hashed: a file rewritten in place
        meanwhile (even keeping its size and mtime, as ``cp -p`` does: the inode's change time still moves) is
        hashed and decoded again, so the manifest's sha256 always describes the features. (A file replaced by a
        rename does not matter: the descriptor still reads the bytes that were hashed.)"""
        source = track.source
        for _ in range(_DECODE_TRIES):
            signal = load_mono(opened, sampling_rate, limits=self.config.limits)
            now = os.fstat(opened.fd)
            if identity(now) == identity(track.stat):
                return signal
            log.info("%s changed while it was read: reading it again.", source.relative)
            sha = sha256_fd(opened.fd)
            track.stat = now
            self.store.manifest.update_content(self.store.dataset, source.track_id, size=now.st_size,
                                               mtime_ns=now.st_mtime_ns, sha256=sha, file_identity=file_identity(now))
        raise OSError(f"{source.path} kept changing while it was read ({_DECODE_TRIES} tries): it is tried again "
                      "on the next run")

    def abandon(self, job: TrackJob) -> None:
        """Release a prepared track that will not be extracted (its row stays pending: redone next run)."""
        job.context.release()

    # --- extract, write -----------------------------------------------------------------------------------------
    def model(self) -> LoadedModel:
        """The model, loaded on first use only (a run with nothing new never loads it)."""
        with self._lock:
            if self._model is None:
                # A hub model is loaded at the commit the key names, not at wherever its branch has moved since.
                revision = self.identity["resolved_revision"] or self.config.revision
                self._model = self.model_loader(self.config.model, revision, self.config.device,
                                                trust_remote_code=self.config.trust_remote_code)
                problem = precision_problem(self.precision, self._model.device)
                if problem is not None:
                    self._model = None
                    raise ModelError(
                        f"this worker's device cannot run {self.precision}, the precision of dataset "
                        f"'{self.store.dataset}' ({problem}): run it on a worker that can (CUDA or CPU), or "
                        f"re-extract the dataset in another precision (--precision fp32 --reextract)")
                if self.precision == "bf16" and self._model.device.type == "cpu":
                    log.info("Running bf16 autocast on the CPU: the precision of dataset '%s' (slower than fp32 "
                             "where the CPU has no bf16 instructions).", self.store.dataset)
                provenance = build_provenance(self.config, self._model, self.key, self.precision, self.identity)
                if self.store.read_provenance() != provenance:
                    self.store.write_provenance(provenance)
                self._extractor = Extractor(
                    self._model, round(self.config.window.window_seconds * self._model.sampling_rate),
                    self.config.batch_size, self.precision, self.config.keep_raw)
            return self._model

    def extract(self, jobs: Iterable[TrackJob], slot: Callable[[], ContextManager] = contextlib.nullcontext
                ) -> list[FileOutcome]:
        """Run prepared tracks through the model and write them; model work happens inside ``slot()``.

        ``slot`` is where the flows take a GPU concurrency slot, so only model work holds one.
        """
        outcomes = []
        taken: list[TrackJob] = []
        names = [job.context.source.relative for job in jobs] if isinstance(jobs, (list, tuple)) else []
        model_work = "running the model" + (f" on {', '.join(names[:3])}" if names else "") + (
            f" and {len(names) - 3} more" if len(names) > 3 else "")

        def take() -> Iterator[TrackJob]:
            for job in jobs:
                taken.append(job)
                yield job

        try:
            self.model()
            self.activity.set("waiting for the model (the run's GPU slot, or another chunk's model work)")
            with slot():
                started_wall = time.time()
                before = self._extractor.stats.model_seconds
                try:
                    with self.monitor.stage("extract") if self.monitor else contextlib.nullcontext():
                        on_raw = self._on_raw if self.config.keep_raw else None
                        self.activity.set(model_work)
                        for job in self._extractor.run(take(), on_raw=on_raw):
                            outcomes.append(self._finish(job))
                            self.activity.set(model_work)
                finally:
                    with self._lock:
                        self.model_work.append((started_wall, time.time()))
                        self.stage_seconds["extract"] += self._extractor.stats.model_seconds - before
        finally:
            # Stopped by an error (the manifest cannot be written, ...) or closed early: tracks in hand and those
            # prepared ahead are given back (their rows stay pending: the next run redoes them).
            if hasattr(jobs, "close"):
                jobs.close()
            for job in [*taken, *(jobs if isinstance(jobs, (list, tuple)) else ())]:
                job.context.release()
        with self._lock:
            self.stage_files["extract"] += len(outcomes)
            self.stage_audio_seconds["extract"] += sum(o.duration_seconds or 0.0 for o in outcomes)
        return outcomes

    def _on_raw(self, job: TrackJob, index: int, window: np.ndarray) -> None:
        track: _Track = job.context
        if track.raw is None:
            track.raw = track.resources.enter_context(
                self.store.raw_writer(job.track_id, (job.n_windows, *window.shape)))
        track.raw[index] = window

    def _finish(self, job: TrackJob) -> FileOutcome:
        track: _Track = job.context
        if job.error is not None:
            self._fail(track, "extract", job.error)
            return self.outcomes[job.track_id]
        try:
            self.activity.set(f"writing the features of {track.source.relative}", job.track_id, "write")
            with self._stage("write", files=1, audio_seconds=track.duration_seconds):
                segments = job.segments
                if not np.isfinite(segments).all():
                    raise MessError("the model produced non-finite values (NaN or inf)")
                self.store.write_segments(job.track_id, segments, job.aggregated())
                track.resources.close()  # puts the raw file in place
            with self._stage("integrity", files=1, audio_seconds=track.duration_seconds):
                shapes = ExpectedShapes(job.n_windows, segments.shape[1], segments.shape[2])
                if not self.store.outputs_valid(job.track_id, shapes, self.config.keep_raw):
                    raise MessError("the written files do not read back with the expected shapes")
        except Exception as exc:  # noqa: BLE001 - e.g. disk full: recorded, retried
            self._fail(track, "write", exc)
            return self.outcomes[job.track_id]
        seconds = time.perf_counter() - track.started
        try:
            track.settled = True
            self.store.manifest.mark_done(self.store.dataset, job.track_id,
                                          duration_seconds=track.duration_seconds, n_windows=job.n_windows,
                                          seconds_spent=seconds)
        finally:
            track.release()
        outcome = FileOutcome(job.track_id, track.source.relative, "done", attempts=track.attempts,
                              duration_seconds=track.duration_seconds, seconds=seconds)
        self._record(outcome)
        return outcome

    # --- integrity ---------------------------------------------------------------------------------------------
    def check(self) -> list[str]:
        """Structural integrity of the whole dataset (files, shapes, orphans, temporary files)."""
        with self._stage("integrity"):
            report = IntegrityReport()
            self.activity.set(f"checking the store {self.store.root}")
            check_dataset(self.store, report, check_values=False)
        return [f"{p.path or p.track_id}: {p.reason}" for p in report.problems]


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
    prefetch_depth: int = 2,
    reextract: bool = False,
) -> RunSummary:
    """Extract features for every new or changed audio file under ``audio_dir`` into ``store_root``, in plain
    Python (no Prefect).

    ``dataset`` defaults to the audio folder's name. ``only_failed`` re-runs just the files whose last attempt
    failed. ``reextract`` lets a run with another config than the dataset's replace its features (else refused).
    Raises ``FileNotFoundError`` for a missing folder, ``ModelError`` when the model cannot be loaded,
    ``DatasetMismatchError`` when the dataset holds another folder's recordings or another config's features
    (without ``reextract``), and ``StoreError`` when the store cannot be used; a bad audio file never raises,
    it is recorded.
    """
    wall_started = time.perf_counter()
    config = config or ExtractConfig()
    audio_dir = Path(audio_dir)
    monitor = ResourceMonitor(resolve_device(config.device))
    session = ExtractionSession(store_root, dataset or audio_dir.absolute().name, config,
                                manifest_url=manifest_url, progress=progress, model_loader=model_loader,
                                monitor=monitor, reextract=reextract)
    try:
        with monitor:
            sources = session.discover(audio_dir)
            pending = session.plan(sources, only_failed)
            log.info("Found %d audio files in %s: %d to extract (%s).", len(sources), audio_dir, len(pending),
                     session.counts().describe(finished=False))
            valid = session.validate(pending)
            suspects, others = session.isolate(valid)
            for suspect in suspects:  # alone: nothing else in flight
                session.extract(list(session.preprocess([suspect])))
            if others:
                jobs = session.preprocess(others)
                if prefetch_depth > 0:
                    jobs = prefetch(jobs, prefetch_depth, session.abandon)
                session.extract(jobs)
            problems = session.check()
        summary = session.summary(audio_dir, time.perf_counter() - wall_started, problems)
    finally:
        session.close()
    log.info("Done: %s, in %.1f s.", summary.counts.describe(), summary.wall_seconds)
    return summary


async def run_extraction_async(audio_dir: str | Path, store_root: str | Path, **kwargs: Any) -> RunSummary:
    """``run_extraction`` off the event loop (for async callers such as a web backend)."""
    return await asyncio.to_thread(run_extraction, audio_dir, store_root, **kwargs)
