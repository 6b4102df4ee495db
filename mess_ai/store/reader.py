"""Read a dataset of a feature store: its done tracks, their embeddings at each scale and layer, and where each
window lies in time.

    >>> from mess_ai.store.reader import open_store
    >>> reader = open_store("/data/features")            # the store's only dataset, or dataset="..."
    >>> reader.track_ids                                  # sorted by path relative to the audio folder
    >>> X = reader.aggregated(layer="mean")               # float32 [n_tracks, hidden]
    >>> S = reader.segments(reader.track_ids[0], layer=6)  # float32 [n_windows, hidden]
    >>> T = reader.window_times(reader.track_ids[0])      # float64 [n_windows, 2]: start, end seconds

A reader is a snapshot of the manifest when it was opened; the arrays are read from disk when asked for.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from mess_ai.audio.windows import WindowSpec, window_times
from mess_ai.errors import StoreError
from mess_ai.store.atomic import load_npy, read_npy_header
from mess_ai.store.integrity import config_mix
from mess_ai.store.layers import LAYER_ALL, LAYER_MEAN, Layer, check_layer, select_layer
from mess_ai.store.layout import MANIFEST_FILE, PROVENANCE_FILE, SCALES, FeatureStore, check_dataset_name
from mess_ai.store.manifest import DONE


@dataclass(frozen=True)
class TrackInfo:
    """One extracted track, as the manifest records it. ``n_samples``: of the decoded signal at the model's rate,
    None in rows written before mess-ai recorded it."""

    track_id: str
    relative_path: str
    source_path: str
    sha256: str | None
    config_key: str | None
    duration_seconds: float | None
    n_windows: int | None = None
    n_samples: int | None = None


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
        raise StoreError(f"dataset '{dataset}' cannot be read as one collection: {mix}")
    tracks = [TrackInfo(r["track_id"], r["relative_path"], r["source_path"], r["sha256"], r["config_key"],
                        r["duration_seconds"], r["n_windows"], r["n_samples"]) for r in rows]
    return dataset, tracks, provenance


def feature_path(store_root: str | Path, dataset: str, scale: str, track_id: str) -> Path:
    """Where a track's features of ``scale`` (``segments``, ``aggregated``, ``raw``) are stored."""
    return Path(store_root).absolute() / dataset / scale / f"{track_id}.npy"


def aggregated_path(store_root: str | Path, dataset: str, track_id: str) -> Path:
    return feature_path(store_root, dataset, "aggregated", track_id)


def load_aggregated(store_root: str | Path, dataset: str, tracks: Sequence[TrackInfo],
                    layer: Layer = LAYER_MEAN) -> tuple[np.ndarray, Layer]:
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
            raise _missing(path, track, store_root) from None
    if len(shapes) > 1:
        described = ", ".join(f"{count} with shape {list(shape)} (e.g. {example[shape]})"
                              for shape, count in shapes.most_common())
        raise ValueError(f"dataset {dataset!r} mixes embedding dimensions ({described}): "
                         "were tracks extracted with different models? Analyse one model per dataset")
    shape = next(iter(shapes))
    if len(shape) != 2:
        raise ValueError(f"aggregated features must be [n_states, hidden]; dataset {dataset!r} has {list(shape)}")
    layer = check_layer(layer, shape[0], (LAYER_MEAN, LAYER_ALL))
    out_shape = (len(tracks), *shape) if layer == LAYER_ALL else (len(tracks), shape[1])
    out = np.empty(out_shape, dtype=np.float32)
    for i, (track, path) in enumerate(zip(tracks, paths)):
        array = load_npy(path)
        out[i] = array if layer == LAYER_ALL else select_layer(array, layer)
        bad = int(np.size(out[i]) - np.count_nonzero(np.isfinite(out[i])))
        if bad:
            raise ValueError(f"track {track.track_id} ({track.relative_path}) has {bad} non-finite values "
                             f"(NaN or inf) in its aggregated features: re-extract it")
    return out, layer


def _missing(path: Path, track: TrackInfo, store_root: str | Path) -> StoreError:
    return StoreError(f"{path} is missing although the manifest marks {track.relative_path} done: "
                      f"run `mess-ai check --store {store_root}`")


class StoreReader:
    """The done tracks of one dataset of a store, and their features (see ``open_store``).

    ``tracks``: the manifest's rows (sorted by relative path); ``provenance``: the dataset's ``provenance.json``
    (model, revision, weights, sampling rate, window and hop seconds, ...).
    """

    def __init__(self, store_root: str | Path, dataset: str, tracks: Sequence[TrackInfo],
                 provenance: dict[str, Any]) -> None:
        self.store_root = Path(store_root).absolute()
        self.dataset = dataset
        self.tracks = tuple(tracks)
        self.provenance = provenance
        self._by_id = {track.track_id: track for track in self.tracks}

    @property
    def track_ids(self) -> list[str]:
        return [track.track_id for track in self.tracks]

    def track(self, track_id: str) -> TrackInfo:
        """The manifest's row of ``track_id``; KeyError naming the dataset when it is not a done track of it."""
        try:
            return self._by_id[track_id]
        except KeyError:
            raise KeyError(f"{track_id!r} is not a done track of dataset {self.dataset!r}") from None

    def aggregated(self, layer: Layer = LAYER_MEAN, track_ids: Sequence[str] | None = None) -> np.ndarray:
        """The tracks' aggregated embeddings (mean over all windows and frames), in the order of ``track_ids``
        (default: every track): float32 [n_tracks, hidden] for a layer index or ``"mean"``, [n_tracks, n_states,
        hidden] for ``"all"``."""
        tracks = self.tracks if track_ids is None else [self.track(track_id) for track_id in track_ids]
        return load_aggregated(self.store_root, self.dataset, tracks, layer)[0]

    def segments(self, track_id: str, layer: Layer = LAYER_ALL) -> np.ndarray:
        """A track's per-window embeddings (mean over each window's frames): float32 [n_windows, n_states, hidden]
        for ``"all"``, [n_windows, hidden] for a layer index or ``"mean"``."""
        track = self.track(track_id)
        path = feature_path(self.store_root, self.dataset, "segments", track_id)
        try:
            array = load_npy(path)
        except FileNotFoundError:
            raise _missing(path, track, self.store_root) from None
        if array.ndim != 3:
            raise StoreError(f"{path}: segments must be [n_windows, n_states, hidden], found {list(array.shape)}")
        if track.n_windows is not None and array.shape[0] != track.n_windows:
            raise StoreError(f"{path} holds {array.shape[0]} windows, the manifest records {track.n_windows} for "
                             f"{track.relative_path}: run `mess-ai check --store {self.store_root}`")
        layer = check_layer(layer, array.shape[1], (LAYER_MEAN, LAYER_ALL))
        return array if layer == LAYER_ALL else select_layer(array, layer)

    @property
    def n_states(self) -> int:
        """Hidden states per embedding (13 for MERT-v1-95M: the convolutional front end, then 12 layers)."""
        return int(self._provenance_value("num_hidden_states"))

    @property
    def hidden_size(self) -> int:
        return int(self._provenance_value("hidden_size"))

    @property
    def sampling_rate(self) -> int:
        """The rate (Hz) the audio was resampled to before it was cut into windows."""
        return int(self._provenance_value("sampling_rate"))

    @property
    def window_spec(self) -> WindowSpec:
        """How the audio was cut into windows, as the provenance records it."""
        return WindowSpec(float(self._provenance_value("window_seconds")),
                          float(self._provenance_value("hop_seconds")),
                          float(self._provenance_value("min_duration_seconds")))

    def window_times(self, track_id: str, stored_windows: int | None = None) -> np.ndarray:
        """Where each of a track's windows lies in its audio: float64 [n_windows, 2], start and end seconds, by the
        rule the windows were cut with (the last window ends at the track's duration).

        The sample count is the manifest's ``n_samples`` or, in rows written before it was recorded,
        ``round(duration_seconds * sampling_rate)`` (exact: the duration is that count over the rate). StoreError
        when the windows derived are not as many as the manifest and the segments file hold: times that cannot
        be trusted are never returned. ``stored_windows``: the segments file's window count, when the caller has
        read the file already (its header is read otherwise)."""
        track = self.track(track_id)
        rate = self.sampling_rate
        n_samples = track.n_samples
        if n_samples is None:
            if track.duration_seconds is None:
                raise StoreError(f"the manifest records no duration for {track.relative_path} (dataset "
                                 f"{self.dataset!r}): its window times cannot be derived; re-extract it")
            n_samples = round(track.duration_seconds * rate)
        spec = self.window_spec
        try:
            times = window_times(n_samples, rate, spec)
        except ValueError as exc:
            raise StoreError(f"window times of {track.relative_path} (dataset {self.dataset!r}): {exc}") from exc
        path = feature_path(self.store_root, self.dataset, "segments", track_id)
        stored = stored_windows
        if stored is None:
            try:
                stored = read_npy_header(path)[0][0]
            except FileNotFoundError:
                raise _missing(path, track, self.store_root) from None
        if len(times) != stored or (track.n_windows is not None and len(times) != track.n_windows):
            raise StoreError(
                f"window times of {track.relative_path} (dataset {self.dataset!r}) do not match its features: "
                f"{n_samples} samples at {rate} Hz in windows of {spec.window_seconds} s every {spec.hop_seconds} s "
                f"give {len(times)} windows, but {path} holds {stored} and the manifest records {track.n_windows}: "
                "re-extract the track")
        return times

    def _provenance_value(self, name: str) -> Any:
        value = self.provenance.get(name)
        if value is None:
            raise StoreError(f"the provenance.json of dataset {self.dataset!r} in {self.store_root} records no "
                             f"{name}: was the dataset extracted by mess-ai?")
        return value


def open_store(store: str | Path, dataset: str | None = None, manifest_url: str | None = None) -> StoreReader:
    """A reader of ``dataset`` of the store at ``store`` (None: the store's only dataset), with the done tracks the
    manifest holds now (``manifest_url``: a SQLAlchemy URL instead of the store's SQLite file).

    FileNotFoundError for a store or dataset that does not exist, ValueError when ``dataset`` is None and the store
    holds several, StoreError when the dataset mixes features of two configs."""
    name, tracks, provenance = read_tracks(store, dataset, manifest_url)
    return StoreReader(store, name, tracks, provenance)
