"""The work on files, in small steps: what the plan needs to know of them; read a header, open a file, hash it,
decode and window it, write its features and check them; and the model a dataset's features are made with. Each
step raises on trouble; the session records the failure against the file and goes on. ``embed_file`` takes one
file through the same steps outside any store (a query recording)."""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np

from mess_ai.audio import AudioSource, load_mono, probe_audio, window_bounds
from mess_ai.audio.opening import OpenedAudio, identity, open_audio, sha256_fd
from mess_ai.config import ExtractConfig
from mess_ai.deadline import Activity
from mess_ai.errors import InputError, MessError, ModelError
from mess_ai.extraction.plan import (
    PLAN_COLUMNS,
    FileState,
    Row,
    Selection,
    known_sha256,
    needs_content,
    outputs_to_check,
)
from mess_ai.extraction.track import TrackAttempt
from mess_ai.store import ExpectedShapes, FeatureStore

if TYPE_CHECKING:  # torch comes with them: the plan (file_states) runs without it, see mess_ai.extraction.noop
    from mess_ai.features.extractor import Extractor, TrackJob
    from mess_ai.features.loaded import LoadedModel

log = logging.getLogger(__name__)

# Reads of a file that changes while it is read, before the attempt fails (and is retried next run).
DECODE_TRIES = 3


def header_duration(source: AudioSource, config: ExtractConfig) -> float:
    """Seconds of audio the file's header announces, once the header passes the checks (``probe_audio``)."""
    return probe_audio(source.path, config.window.min_duration_seconds, config.limits).duration_seconds


@contextlib.contextmanager
def opened_or_error(source: AudioSource, allow_empty: bool = False
                    ) -> Iterator[tuple[OpenedAudio | None, BaseException | None]]:
    """(the file opened the safe way, None), or (None, why it could not be opened): opened once, not following
    links, never waiting on a FIFO, then hashed and decoded from that descriptor (the bytes hashed are the bytes
    decoded). Closed when the block ends."""
    with contextlib.ExitStack() as files:
        opened, error = None, None
        try:
            opened = files.enter_context(open_audio(source.path, allow_empty=allow_empty))
        except (OSError, InputError) as exc:
            error = exc
        yield opened, error


def content_hash(source: AudioSource, row: Row | None) -> str:
    """sha256 of the file's bytes: the row's while size, mtime and identity are unchanged, else read from the file
    opened the safe way (a FIFO raises at once, never blocks)."""
    known = known_sha256(row, os.stat(source.location))
    if known is not None:
        return known
    with open_audio(source.path, allow_empty=True) as opened:
        return sha256_fd(opened.fd)


def plan_rows(store: FeatureStore, sources: list[AudioSource], selection: Selection, whole_dataset: bool
              ) -> dict[str, Row]:
    """The manifest rows ``file_states`` needs, of the sources ``selection`` may take, with the plan's columns:
    read by key, so that the cost follows the files asked about (a chunk, the files a watcher names), or with
    ``whole_dataset`` in one query of the dataset (a plan of the whole folder, once per run)."""
    if whole_dataset and selection.files is None:
        return store.manifest.rows_by_track(store.dataset, PLAN_COLUMNS)
    wanted = [source.track_id for source in sources if selection.files is None or source.relative in selection.files]
    return store.manifest.rows_of(store.dataset, wanted, PLAN_COLUMNS)


def file_states(store: FeatureStore, sources: list[AudioSource], rows: dict[str, Row], key: str,
                selection: Selection, keep_raw: bool, activity: Activity) -> list[FileState]:
    """What the plan needs to know of each source: its manifest row (from ``rows``: see ``plan_rows``) and, where
    the plan looks at them, the hash of its bytes now and whether its stored features read back."""
    provenance = store.read_provenance() or {}
    states = []
    for source in sources:
        row = rows.get(source.track_id)
        if not needs_content(source.relative, row, key, selection):
            states.append(FileState(source.relative, row))
            continue
        activity.set(f"checking whether {source.relative} changed")
        try:
            sha = content_hash(source, row)
        except (OSError, InputError):  # unreadable now, or not a regular file: the attempt records why
            states.append(FileState(source.relative, row))
            continue
        shapes = outputs_to_check(row, sha, provenance, key)
        valid = shapes is not None and store.outputs_valid(source.track_id, shapes, keep_raw)
        states.append(FileState(source.relative, row, sha, valid))
    return states


def decode_unchanged(track: TrackAttempt, opened: OpenedAudio, sampling_rate: int, config: ExtractConfig
                     ) -> np.ndarray:
    """Decode the opened file (float32 [n_samples] at ``sampling_rate``), making sure the bytes decoded are the
    bytes hashed: a file rewritten in place meanwhile (even keeping its size and mtime, as ``cp -p`` does: the
    inode's change time still moves) is hashed and decoded again, so the manifest's sha256 always describes the
    features. (A file replaced by a rename does not matter: the descriptor still reads the bytes that were hashed.)"""
    for _ in range(DECODE_TRIES):
        signal = load_mono(opened, sampling_rate, limits=config.limits)
        now = os.fstat(opened.fd)
        if identity(now) == identity(track.stat):
            return signal
        log.info("%s changed while it was read: reading it again.", track.source.relative)
        track.content_changed(now, sha256_fd(opened.fd))
    raise OSError(f"{track.source.path} kept changing while it was read ({DECODE_TRIES} tries): it is tried again "
                  "on the next run")


def decode_track(track: TrackAttempt, opened: OpenedAudio, sampling_rate: int, config: ExtractConfig) -> TrackJob:
    """Decode, resample and window one opened track into a job for the model (carrying ``track``). Audio that
    cannot be used (shorter than the minimum once decoded) raises ``InputError``."""
    return track_job(track, decode_unchanged(track, opened, sampling_rate, config), sampling_rate, config)


def track_job(track: TrackAttempt, signal: np.ndarray, sampling_rate: int, config: ExtractConfig) -> TrackJob:
    """The job for the model of a track decoded to ``signal`` (float32 [n_samples] at ``sampling_rate``), here or
    by a decoding process; ``InputError`` when it is shorter than the minimum."""
    from mess_ai.features.extractor import TrackJob

    track.n_samples = len(signal)
    track.duration_seconds = len(signal) / sampling_rate
    bounds = signal_windows(track.source.path, signal, sampling_rate, config)
    return TrackJob(track.source.track_id, signal, bounds, context=track)


def signal_windows(path: str | Path, signal: np.ndarray, sampling_rate: int, config: ExtractConfig
                   ) -> list[tuple[int, int]]:
    """The (start, length) of the windows of ``path`` decoded to ``signal`` (float32 [n_samples] at
    ``sampling_rate``); ``InputError`` naming the file when it is shorter than the minimum."""
    try:
        return window_bounds(len(signal), sampling_rate, config.window)
    except ValueError as exc:  # decoded audio shorter than the minimum
        raise InputError(path, str(exc), "preprocess") from exc


def embed_file(path: str | Path, config: ExtractConfig, extractor: Extractor) -> TrackJob:
    """One audio file through the steps extraction takes, outside any store (nothing is written, no lock taken):
    opened the safe way, its header checked (``probe_audio``, as ``header_duration``), decoded and resampled to the
    model's rate (``load_mono``), cut into windows (``signal_windows``) and run through ``extractor``
    (``extractor_for``: the model, batch size and precision). Returns the finished job: ``signal`` float32
    [n_samples], ``segments`` float32 [n_windows, n_states, hidden], ``aggregated()`` float32 [n_states, hidden].

    Bad input raises ``InputError`` naming the file and the reason (not a regular file, not audio, too short,
    undecodable); a failure of the system ``OSError``; the model's own failure its exception.
    """
    from mess_ai.features.extractor import TrackJob

    path = Path(path)
    sampling_rate = extractor.model.sampling_rate
    with open_audio(path) as opened:
        probe_audio(opened, config.window.min_duration_seconds, config.limits)
        signal = load_mono(opened, sampling_rate, limits=config.limits)
    job = TrackJob(path.name, signal, signal_windows(path, signal, sampling_rate, config))
    (job,) = extractor.run([job])
    if job.error is not None:
        raise job.error
    model_segments(job)
    return job


def model_segments(job: TrackJob) -> np.ndarray:
    """The segments float32 [n_windows, n_states, hidden] of a job the model is done with; ``MessError`` when the
    model produced non-finite values."""
    if not np.isfinite(job.segments).all():
        raise MessError("the model produced non-finite values (NaN or inf)")
    return job.segments


def write_features(store: FeatureStore, job: TrackJob, sync_dirs: bool = True) -> None:
    """Write one track's segments and aggregated features, and put its raw file (if any) in place. ``sync_dirs``
    False: the caller makes the renames durable (``FeatureStore.sync_feature_dirs``) for several tracks at once."""
    store.write_segments(job.track_id, model_segments(job), job.aggregated(), sync_dirs=sync_dirs)
    job.context.complete_files()


def check_written(store: FeatureStore, job: TrackJob, keep_raw: bool) -> None:
    """Read back the headers of what ``write_features`` wrote; raises when a shape is not the one expected."""
    shapes = ExpectedShapes(job.n_windows, job.segments.shape[1], job.segments.shape[2])
    if not store.outputs_valid(job.track_id, shapes, keep_raw):
        raise MessError("the written files do not read back with the expected shapes")


def load_model(config: ExtractConfig, identity: dict[str, Any], precision: str, dataset: str,
               loader: Callable[..., LoadedModel]) -> LoadedModel:
    """The model the content key names, on a device that can run the dataset's ``precision``; ``ModelError`` when
    this worker's device cannot."""
    from mess_ai.features.extractor import precision_problem

    # A hub model is loaded at the commit the key names, not at wherever its branch has moved since.
    revision = identity["resolved_revision"] or config.revision
    model = loader(config.model, revision, config.device, trust_remote_code=config.trust_remote_code)
    problem = precision_problem(precision, model.device)
    if problem is not None:
        raise ModelError(
            f"this worker's device cannot run {precision}, the precision of dataset '{dataset}' ({problem}): run it "
            f"on a worker that can (CUDA or CPU), or re-extract the dataset in another precision (--precision fp32 "
            f"--reextract)")
    if precision == "bf16" and model.device.type == "cpu":
        log.info("Running bf16 autocast on the CPU: the precision of dataset '%s' (slower than fp32 where the CPU "
                 "has no bf16 instructions).", dataset)
    return model


def extractor_for(model: LoadedModel, config: ExtractConfig, precision: str) -> Extractor:
    from mess_ai.features.extractor import Extractor

    return Extractor(model, round(config.window.window_seconds * model.sampling_rate), config.batch_size, precision,
                     config.keep_raw)
