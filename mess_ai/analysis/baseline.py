"""A hand-crafted baseline to compare embeddings against: per-track statistics of librosa MFCCs and chroma.

Each track becomes the mean and standard deviation over time of ``n_mfcc`` MFCCs and 12 chroma bins. Results are
cached per track under ``<store>/<dataset>/baseline/``, keyed by the source file's sha256 and the config.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from mess_ai.analysis.loading import TrackInfo
from mess_ai.errors import InputError
from mess_ai.store.atomic import atomic_save_npy, atomic_write_json, load_npy

log = logging.getLogger(__name__)

N_CHROMA = 12
CACHE_DIR = "baseline"
CACHE_INDEX = "index.json"


@dataclass(frozen=True)
class BaselineConfig:
    sample_rate: int = 22050
    n_mfcc: int = 20
    n_fft: int = 2048
    hop_length: int = 512

    def __post_init__(self) -> None:
        for name in ("sample_rate", "n_mfcc", "n_fft", "hop_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} is {getattr(self, name)}; it must be at least 1")

    def key(self) -> str:
        payload = json.dumps({"version": 1, **dataclasses.asdict(self)}, sort_keys=True)
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]

    @property
    def n_features(self) -> int:
        return 2 * (self.n_mfcc + N_CHROMA)


def feature_names(config: BaselineConfig = BaselineConfig()) -> list[str]:
    """Names of the baseline vector's entries, in order."""
    bands = [f"mfcc{i}" for i in range(config.n_mfcc)] + [f"chroma{i}" for i in range(N_CHROMA)]
    return [f"{b}_mean" for b in bands] + [f"{b}_std" for b in bands]


def baseline_features(signal: np.ndarray, sample_rate: int, config: BaselineConfig = BaselineConfig()) -> np.ndarray:
    """signal: float [n_samples] mono at ``sample_rate`` -> float32 [2 * (n_mfcc + 12)] (means, then stds)."""
    import librosa

    signal = np.asarray(signal, dtype=np.float32)
    if signal.ndim != 1 or signal.size == 0:
        raise ValueError(f"signal must be a non-empty 1-D mono array; got shape {list(signal.shape)}")
    if sample_rate != config.sample_rate:
        raise ValueError(f"signal is at {sample_rate} Hz; the config expects {config.sample_rate} Hz")
    if signal.size < config.n_fft:
        raise ValueError(f"signal has {signal.size} samples; the baseline needs at least n_fft = {config.n_fft} "
                         f"({config.n_fft / sample_rate:.3f} s)")
    if not np.isfinite(signal).all():
        raise ValueError("signal has non-finite samples (NaN or inf)")
    power = np.abs(librosa.stft(signal, n_fft=config.n_fft, hop_length=config.hop_length)) ** 2
    mel = librosa.feature.melspectrogram(S=power, sr=sample_rate)
    mfcc = librosa.feature.mfcc(S=librosa.power_to_db(mel), n_mfcc=config.n_mfcc)
    # Chroma bins at A440 for every track: a per-track tuning estimate would shift the bins track by track.
    chroma = librosa.feature.chroma_stft(S=power, sr=sample_rate, n_fft=config.n_fft, tuning=0.0)
    bands = np.concatenate([mfcc, chroma], axis=0)
    return np.concatenate([bands.mean(axis=1), bands.std(axis=1)]).astype(np.float32)


def file_baseline_features(path: str | Path, config: BaselineConfig = BaselineConfig()) -> np.ndarray:
    """Baseline features of an audio file (decoded and resampled to mono at ``config.sample_rate``)."""
    from mess_ai.audio import load_mono

    return baseline_features(load_mono(path, config.sample_rate), config.sample_rate, config)


def dataset_baseline(dataset_dir: str | Path, tracks: Sequence[TrackInfo], config: BaselineConfig = BaselineConfig()
                     ) -> tuple[list[int], np.ndarray, list[dict]]:
    """Baseline features of a dataset's tracks from their source files, reusing the cache when the bytes match.

    Returns the indices (into ``tracks``) that have features, the features float32 [n_found, n_features], and
    ``{"track_id", "relative_path", "reason"}`` for each track whose source could not be used.
    """
    cache = Path(dataset_dir) / CACHE_DIR
    index_path = cache / CACHE_INDEX
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except (FileNotFoundError, ValueError):
        index = {}
    cached = index.get("tracks", {}) if index.get("config_key") == config.key() else {}
    found, rows, skipped, fresh = [], [], [], {}
    for i, track in enumerate(tracks):
        path = cache / f"{track.track_id}.npy"
        vector = None
        if track.sha256 is not None and cached.get(track.track_id) == track.sha256:
            try:
                vector = load_npy(path)
            except (OSError, ValueError):
                vector = None
            if vector is not None and vector.shape != (config.n_features,):
                vector = None
        if vector is None:
            try:
                vector = file_baseline_features(track.source_path, config)
            except (InputError, OSError, ValueError) as exc:
                skipped.append({"track_id": track.track_id, "relative_path": track.relative_path,
                                "reason": str(exc)})
                continue
            if track.sha256 is not None:
                atomic_save_npy(path, vector)
        if track.sha256 is not None:
            fresh[track.track_id] = track.sha256
        found.append(i)
        rows.append(vector)
    if fresh != cached:
        atomic_write_json(index_path, {"config": dataclasses.asdict(config), "config_key": config.key(),
                                       "tracks": fresh})
    if skipped:
        log.warning("baseline: %d of %d source files could not be used (first: %s: %s)", len(skipped),
                    len(tracks), skipped[0]["relative_path"], skipped[0]["reason"])
    features = np.stack(rows) if rows else np.empty((0, config.n_features), dtype=np.float32)
    return found, features, skipped
