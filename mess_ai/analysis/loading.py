"""Read a dataset's stored track embeddings and their metadata from a feature store, for analysis and search."""

from __future__ import annotations

import hashlib
import json
import posixpath
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from mess_ai.analysis.preprocessing import LAYER_MEAN, Layer, check_layer
from mess_ai.errors import StoreError
from mess_ai.store import DONE, SCALES, FeatureStore, check_dataset_name, load_npy
from mess_ai.store.atomic import read_npy_header
from mess_ai.store.integrity import config_mix
from mess_ai.store.layout import MANIFEST_FILE, PROVENANCE_FILE

LAYER_ALL = "all"


@dataclass(frozen=True)
class TrackInfo:
    """One extracted track, as the manifest records it."""

    track_id: str
    relative_path: str
    source_path: str
    sha256: str | None
    config_key: str | None
    duration_seconds: float | None


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


def list_datasets(store_root: str | Path) -> list[str]:
    """The dataset folders of a store (those with a feature scale folder or a provenance file)."""
    root = Path(store_root)
    if not root.is_dir():
        raise FileNotFoundError(f"store folder {root} does not exist")
    return sorted(p.name for p in root.iterdir()
                  if p.is_dir() and not p.name.startswith(".")
                  and (any((p / s).is_dir() for s in SCALES) or (p / PROVENANCE_FILE).exists()))


def resolve_dataset(store_root: str | Path, dataset: str | None) -> str:
    """``dataset`` checked to exist in the store; when None, the store's only dataset."""
    root = Path(store_root)
    if dataset is not None:
        check_dataset_name(dataset)
        if not (root / dataset).is_dir():
            known = list_datasets(root)
            raise FileNotFoundError(f"dataset {dataset!r} does not exist in store {root} "
                                    f"(datasets: {', '.join(known) or 'none'})")
        return dataset
    known = list_datasets(root)
    if len(known) == 1:
        return known[0]
    if not known:
        raise FileNotFoundError(f"store {root} has no dataset folder: extract some audio into it first")
    raise ValueError(f"store {root} has {len(known)} datasets ({', '.join(known)}): choose one with --dataset")


def tracks_fingerprint(tracks: Sequence[TrackInfo]) -> str:
    """A content key of a dataset's done tracks: their ids, source bytes (sha256) and extraction config keys."""
    payload = json.dumps([[t.track_id, t.sha256, t.config_key] for t in tracks])
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def read_tracks(store_root: str | Path, dataset: str | None = None, manifest_url: str | None = None
                ) -> tuple[str, list[TrackInfo], dict]:
    """The dataset's name, its done tracks (sorted by relative path) and its provenance, from the manifest alone
    (``manifest_url``: a SQLAlchemy URL instead of the store's own SQLite file)."""
    dataset = resolve_dataset(store_root, dataset)
    manifest_path = Path(store_root) / MANIFEST_FILE
    if manifest_url is None and not manifest_path.exists():
        raise StoreError(f"no manifest at {manifest_path}: is {store_root} a mess-ai store?")
    # The folder and the manifest exist now, so opening the store creates neither by accident.
    store = FeatureStore(store_root, dataset, manifest_url)
    try:
        rows = store.manifest.rows(dataset, DONE)
        provenance = store.read_provenance() or {}
        mix = config_mix(store.manifest, dataset)
    finally:
        store.close()
    if mix:
        # Features of two configs side by side would compare apples with oranges, silently.
        raise StoreError(f"dataset '{dataset}' cannot be analysed: {mix}")
    tracks = [TrackInfo(r["track_id"], r["relative_path"], r["source_path"], r["sha256"], r["config_key"],
                        r["duration_seconds"]) for r in rows]
    return dataset, tracks, provenance


def aggregated_path(store_root: str | Path, dataset: str, track_id: str) -> Path:
    return Path(store_root).absolute() / dataset / "aggregated" / f"{track_id}.npy"


def load_aggregated(store_root: str | Path, dataset: str, tracks: Sequence[TrackInfo],
                    layer: Layer | str = LAYER_MEAN) -> tuple[np.ndarray, Layer | str]:
    """Stack the tracks' aggregated embeddings: float32 [n_tracks, hidden] (a layer or the mean) or
    [n_tracks, n_states, hidden] (``"all"``), and the layer as a non-negative index, ``"mean"`` or ``"all"``.

    ValueError for mixed shapes or non-finite values.
    """
    if not tracks:
        raise ValueError(f"dataset {dataset!r} has no extracted tracks")
    paths = [aggregated_path(store_root, dataset, track.track_id) for track in tracks]
    # Shapes from the headers first (no memory maps: each holds a file descriptor, and a collection has
    # more tracks than a process may open files).
    shapes: Counter = Counter()
    example: dict[tuple, str] = {}
    for track, path in zip(tracks, paths):
        try:
            shape = read_npy_header(path)[0]
            shapes[shape] += 1
            example.setdefault(shape, track.relative_path)
        except FileNotFoundError:
            raise StoreError(f"{path} is missing although the manifest marks {track.relative_path} done: "
                             f"run `mess-ai check --store {store_root}`") from None
    if len(shapes) > 1:
        described = ", ".join(f"{count} with shape {list(shape)} (e.g. {example[shape]})"
                              for shape, count in shapes.most_common())
        raise ValueError(f"dataset {dataset!r} mixes embedding dimensions ({described}): "
                         "were tracks extracted with different models? Analyse one model per dataset")
    shape = next(iter(shapes))
    if len(shape) != 2:
        raise ValueError(f"aggregated features must be [n_states, hidden]; dataset {dataset!r} has {list(shape)}")
    if layer != LAYER_ALL:
        layer = check_layer(layer, shape[0])
    out_shape = (len(tracks), *shape) if layer == LAYER_ALL else (len(tracks), shape[1])
    out = np.empty(out_shape, dtype=np.float32)
    for i, (track, path) in enumerate(zip(tracks, paths)):
        array = load_npy(path)
        if layer == LAYER_ALL:
            out[i] = array
        elif layer == LAYER_MEAN:
            out[i] = array.mean(axis=0, dtype=np.float64)
        else:
            out[i] = array[layer]
        bad = int(np.size(out[i]) - np.count_nonzero(np.isfinite(out[i])))
        if bad:
            raise ValueError(f"track {track.track_id} ({track.relative_path}) has {bad} non-finite values "
                             f"(NaN or inf) in its aggregated features: re-extract it")
    return out, layer


def load_dataset_features(store_root: str | Path, dataset: str | None = None, layer: Layer | str = LAYER_MEAN,
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
