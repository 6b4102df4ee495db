"""Read a dataset's stored track embeddings and their metadata from a feature store, for analysis and search."""

from __future__ import annotations

import hashlib
import json
import posixpath
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from mess_ai.store.layers import LAYER_MEAN, Layer
# The manifest and the arrays are read by the store's reader; its names stay importable from here.
from mess_ai.store.reader import (  # noqa: F401
    TrackInfo,
    aggregated_path,
    load_aggregated,
    read_tracks,
    resolve_dataset,
)


@dataclass(frozen=True, eq=False)
class DatasetFeatures:
    """The done tracks of a dataset (sorted by relative path) and their aggregated embeddings.

    ``vectors``: float32 [n_tracks, hidden] for one layer or the layer mean, [n_tracks, n_states, hidden] for "all".
    ``fingerprint`` changes exactly when the set of done tracks, their bytes or their extraction config changes.
    """

    store_root: Path
    dataset: str
    tracks: tuple[TrackInfo, ...]
    vectors: np.ndarray
    layer: Layer
    provenance: dict
    fingerprint: str

    @property
    def track_ids(self) -> list[str]:
        return [t.track_id for t in self.tracks]

    @property
    def dataset_dir(self) -> Path:
        return self.store_root / self.dataset


def tracks_fingerprint(tracks: Sequence[TrackInfo]) -> str:
    """A content key of a dataset's done tracks: their ids, source bytes (sha256) and extraction config keys."""
    payload = json.dumps([[t.track_id, t.sha256, t.config_key] for t in tracks])
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def load_dataset_features(store_root: str | Path, dataset: str | None = None, layer: Layer = LAYER_MEAN,
                          manifest_url: str | None = None) -> DatasetFeatures:
    """A dataset's done tracks and their aggregated embeddings (``layer``: an index, ``"mean"`` or ``"all"``).

    ``dataset`` may be None when the store holds exactly one dataset.
    """
    dataset, tracks, provenance = read_tracks(store_root, dataset, manifest_url)
    vectors, resolved = load_aggregated(store_root, dataset, tracks, layer)
    return DatasetFeatures(Path(store_root).absolute(), dataset, tuple(tracks), vectors, resolved, provenance,
                           tracks_fingerprint(tracks))


def match_track(name: str, tracks: Sequence[TrackInfo]) -> int | None:
    """The index of the track ``name`` refers to: a track id, a path relative to the audio folder, or a file name
    that only one track has. None when nothing matches; ValueError when a file name is ambiguous."""
    for i, t in enumerate(tracks):
        if t.track_id == name:
            return i
    wanted = posixpath.normpath(name.strip().replace("\\", "/")).lstrip("/")
    for i, t in enumerate(tracks):
        if t.relative_path == wanted:
            return i
    by_name = [i for i, t in enumerate(tracks) if posixpath.basename(t.relative_path) == wanted]
    if len(by_name) > 1:
        shown = ", ".join(tracks[i].relative_path for i in by_name[:5])
        raise ValueError(f"{name!r} names {len(by_name)} tracks ({shown}): give the path relative to the "
                         "audio folder or the track id")
    return by_name[0] if by_name else None
