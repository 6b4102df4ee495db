"""Export a dataset's embeddings as Parquet tables that pandas, polars, DuckDB and Hugging Face ``datasets`` read.

Layout under ``out``, one folder per dataset::

    <out>/<dataset>/tracks/part-00000.parquet    one row per done track: ids, paths, sha256, duration, embeddings
    <out>/<dataset>/windows/part-00000.parquet   one row per window: track id, index, start and end seconds, vectors
    <out>/<dataset>/export.json                  the index: which tracks each part holds, the provenance

A track goes to the part a hash of its id names (``part_of``), so a changed, added or removed track changes only
its own part. A re-export compares each part's content key (its tracks' ids, bytes, config keys and paths, the layer
choice and the provenance) with the index and rewrites only the parts whose key changed, removes parts that became
empty, and leaves the others untouched. The number of parts is a power of two, kept while the dataset stays within
a factor of two of its size (parts of ``tracks_per_part / 4`` to ``2 * tracks_per_part`` tracks); past that every
track moves and every part is rewritten once.

Only the aggregated and segments scales are exported; the raw frame-level features (float16) are not.
pyarrow is imported only when an export runs: extraction workers do without it.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import numpy as np

from mess_ai.errors import StoreError, TrackBusyError
from mess_ai.packages import check_export_packages
from mess_ai.store.atomic import TEMP_MARKER, atomic_target, atomic_write_json
from mess_ai.store.layers import LAYER_ALL, LAYER_MEAN, Layer, check_layer
from mess_ai.store.lock import TrackLock
from mess_ai.store.reader import StoreReader, TrackInfo, open_store

if TYPE_CHECKING:
    import pyarrow as pa

EXPORT_FORMAT_VERSION = 1
INDEX_FILE = "export.json"
TABLES = ("tracks", "windows")
# The layer choices an export takes: one column per hidden state ("all"), or one column "embedding".
EXPORT_LAYERS = (LAYER_ALL, LAYER_MEAN)
TRACKS_PER_PART = 500
# Schema metadata key under which every file carries the provenance (JSON).
METADATA_KEY = b"mess_ai"
# What the provenance says about the numbers (not the library versions of the run that wrote it last).
_PROVENANCE_FIELDS = ("config_key", "model", "revision", "resolved_revision", "weights_sha256", "model_fingerprint",
                      "sampling_rate", "window_seconds", "hop_seconds", "min_duration_seconds", "num_hidden_states",
                      "hidden_size", "precision", "feature_format_version")
# Window rows are written in row groups of about this many bytes of vectors: a part never sits whole in memory.
_ROW_GROUP_BYTES = 64 << 20


@dataclass(frozen=True)
class ExportSummary:
    """What an export did: the parts written, kept (unchanged) and removed (their tracks gone), the rows the export
    holds now (tracks and windows, over every part) and its Parquet files."""

    dataset: str
    folder: Path
    layer: Layer
    written: tuple[str, ...]
    kept: tuple[str, ...]
    removed: tuple[str, ...]
    tracks: int
    windows: int
    files: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {"dataset": self.dataset, "folder": str(self.folder), "layer": self.layer,
                "written": list(self.written), "kept": list(self.kept), "removed": list(self.removed),
                "tracks": self.tracks, "windows": self.windows, "files": self.files,
                "seconds": round(self.seconds, 3)}

    def describe(self) -> str:
        """'exported dataset 'x' (6 tracks, 14 windows, layer all) to /out/x: 2 parts written, 1 kept, 0 removed
        (6 Parquet files, 0.4 s)'."""
        return (f"exported dataset '{self.dataset}' ({self.tracks} tracks, {self.windows} windows, layer "
                f"{self.layer}) to {self.folder}: {len(self.written)} parts written, {len(self.kept)} kept, "
                f"{len(self.removed)} removed ({self.files} Parquet files, {self.seconds:.1f} s)")

    def markdown(self) -> str:
        """The export as a Markdown document: where, what was written, kept and removed, how to read it."""
        def names(parts: tuple[str, ...]) -> str:
            return ", ".join(f"`{part}`" for part in parts) if parts else "none"

        return "\n".join([
            f"# Export of dataset `{self.dataset}`", "",
            "| | |", "|---|---|",
            f"| folder | `{self.folder}` |",
            f"| tracks (rows of `tracks/`) | {self.tracks} |",
            f"| windows (rows of `windows/`) | {self.windows} |",
            f"| layer | {self.layer} |",
            f"| Parquet files | {self.files} |",
            f"| seconds | {self.seconds:.1f} |", "",
            f"**Written** ({len(self.written)}): {names(self.written)}", "",
            f"**Kept unchanged** ({len(self.kept)}): {names(self.kept)}", "",
            f"**Removed** ({len(self.removed)}): {names(self.removed)}", "",
            f"Read it with `pandas.read_parquet('{self.folder / 'tracks'}')` or "
            f"`datasets.load_dataset('parquet', data_files='{self.folder / 'windows'}/*.parquet')`.",
        ])


def part_of(track_id: str, n_parts: int) -> int:
    """The part a track belongs to: a stable hash of its id (the same on every machine and Python run)."""
    return int.from_bytes(hashlib.sha256(track_id.encode("utf-8")).digest()[:8], "big") % n_parts


def part_count(n_tracks: int, tracks_per_part: int, previous: int | None) -> int:
    """The number of parts for ``n_tracks``: the smallest power of two giving at most ``tracks_per_part`` tracks
    per part on average, or ``previous`` (the last export's) while that is within a factor of two of it, so that a
    dataset growing or shrinking a little keeps its partition and only its changed parts are rewritten."""
    if tracks_per_part < 1:
        raise ValueError(f"tracks_per_part must be at least 1, got {tracks_per_part}")
    wanted = 1
    while wanted * tracks_per_part < n_tracks:
        wanted *= 2
    if previous and previous & (previous - 1) == 0 and previous // 2 <= wanted <= previous * 2:
        return previous
    return wanted


def export_parquet(store: str | Path, out: str | Path, dataset: str | None = None, layer: Layer = LAYER_ALL,
                   manifest_url: str | None = None, tracks_per_part: int = TRACKS_PER_PART) -> ExportSummary:
    """Export the done tracks of ``dataset`` (None: the store's only one) to ``<out>/<dataset>/`` as Parquet
    tables, rewriting only the parts whose content changed since the last export there (see the module's doc).

    ``layer``: ``"all"`` gives one column per hidden state, ``layer_0`` ... ``layer_<n-1>``, each a
    ``fixed_size_list<float32>[hidden]``; a hidden-state index or ``"mean"`` gives one such column, ``embedding``.
    FileNotFoundError for a store or dataset that does not exist, ValueError for a bad layer, StoreError for a
    store that cannot be read or an export folder another export is writing; ``MissingPackagesError`` without
    pyarrow (the ``export`` extra)."""
    check_export_packages()
    started = time.perf_counter()
    reader = open_store(store, dataset, manifest_url)
    # A dataset without done tracks may have no provenance yet: its (empty) export needs no hidden-state count.
    layer = check_layer(layer, reader.n_states if reader.tracks else None, EXPORT_LAYERS)
    folder = Path(out).absolute() / reader.dataset
    folder.mkdir(parents=True, exist_ok=True)
    lock = TrackLock(folder, ".export")
    try:
        lock.acquire()
    except TrackBusyError:
        raise StoreError(f"another export is writing {folder} right now: wait for it to end") from None
    try:
        return _export(reader, folder, layer, tracks_per_part, started)
    finally:
        lock.release()


def _export(reader: StoreReader, folder: Path, layer: Layer, tracks_per_part: int, started: float) -> ExportSummary:
    index_path = folder / INDEX_FILE
    previous = _read_index(index_path)
    metadata = _metadata(reader, layer)
    n_parts = part_count(len(reader.tracks), tracks_per_part, previous.get("n_parts"))
    by_part: dict[str, list[TrackInfo]] = {}
    for track in sorted(reader.tracks, key=lambda t: t.track_id):
        by_part.setdefault(f"part-{part_of(track.track_id, n_parts):05d}", []).append(track)
    old_parts: dict[str, Any] = previous.get("parts", {})
    parts: dict[str, Any] = {}
    written, kept = [], []
    schemas = _schemas(reader, layer, metadata) if by_part else {}
    for name, tracks in sorted(by_part.items()):
        digest = _content_key(metadata, tracks)
        old = old_parts.get(name)
        if old is not None and old["digest"] == digest and _files_intact(folder, old):
            parts[name] = old
            kept.append(name)
            continue
        parts[name] = _write_part(reader, folder, name, tracks, layer, schemas, digest)
        written.append(name)
    removed = sorted(set(old_parts) - set(parts))
    _remove_strays(folder, parts)
    index = {"format_version": EXPORT_FORMAT_VERSION, "dataset": reader.dataset, "store": str(reader.store_root),
             "layer": layer, "n_parts": n_parts, "provenance": metadata["provenance"],
             "tracks": sum(part["n_tracks"] for part in parts.values()),
             "windows": sum(part["n_windows"] for part in parts.values()), "parts": parts}
    if index != previous:
        # Written last: a reader of the index never sees parts it does not describe as finished.
        atomic_write_json(index_path, index)
    return ExportSummary(reader.dataset, folder, layer, tuple(written), tuple(kept), tuple(removed), index["tracks"],
                         index["windows"], len(parts) * len(TABLES), time.perf_counter() - started)


def _read_index(path: Path) -> dict[str, Any]:
    """The last export's index, or {} when there was none."""
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise StoreError(f"cannot read the export index {path}: {exc}; remove it (and the folder's parts) to "
                         "export anew") from exc
    if index.get("format_version") != EXPORT_FORMAT_VERSION:
        return {}  # another format: every part is written anew
    return index


def _metadata(reader: StoreReader, layer: Layer) -> dict[str, Any]:
    """What every file carries in its schema metadata: the export format, the layer choice and the provenance."""
    provenance = {name: reader.provenance.get(name) for name in _PROVENANCE_FIELDS}
    provenance["mess_ai_version"] = (reader.provenance.get("versions") or {}).get("mess_ai")
    return {"format_version": EXPORT_FORMAT_VERSION, "dataset": reader.dataset, "layer": layer,
            "provenance": provenance}


def _track_fields(track: TrackInfo) -> list[Any]:
    return [track.track_id, track.relative_path, track.source_path, track.sha256, track.config_key,
            track.duration_seconds, track.n_windows, track.n_samples]


def _content_key(metadata: dict[str, Any], tracks: Sequence[TrackInfo]) -> str:
    """A part's content key: changes exactly when a row it holds would change (a track's bytes, config, paths or
    duration; a track added or removed; another layer choice or provenance)."""
    payload = json.dumps([metadata, [_track_fields(track) for track in tracks]], sort_keys=True)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def _files_intact(folder: Path, record: dict[str, Any]) -> bool:
    """A part's files are where the index says, with the sizes it recorded (a file deleted or replaced by hand is
    written again)."""
    for table in TABLES:
        file = record["files"][table]
        try:
            if (folder / file["path"]).stat().st_size != file["bytes"]:
                return False
        except FileNotFoundError:
            return False
    return True


def _remove_strays(folder: Path, parts: dict[str, Any]) -> None:
    """Remove part files no part of this export describes (parts that became empty, files of an export that was
    killed before it wrote its index) and temporary files of killed exports. The export's lock is held."""
    wanted = {record["files"][table]["path"] for record in parts.values() for table in TABLES}
    for table in TABLES:
        directory = folder / table
        if not directory.is_dir():
            continue
        for entry in directory.iterdir():
            relative = f"{table}/{entry.name}"
            stray = entry.name.startswith("part-") and entry.suffix == ".parquet" and relative not in wanted
            if stray or (entry.name.startswith(".part-") and TEMP_MARKER in entry.name):
                entry.unlink(missing_ok=True)


def _vector_type(reader: StoreReader) -> "pa.DataType":
    import pyarrow as pa

    return pa.list_(pa.float32(), reader.hidden_size)


def _vector_fields(reader: StoreReader, layer: Layer) -> list["pa.Field"]:
    import pyarrow as pa

    names = [f"layer_{i}" for i in range(reader.n_states)] if layer == LAYER_ALL else ["embedding"]
    return [pa.field(name, _vector_type(reader), nullable=False) for name in names]


def _schemas(reader: StoreReader, layer: Layer, metadata: dict[str, Any]) -> dict[str, "pa.Schema"]:
    import pyarrow as pa

    tracks = [pa.field("track_id", pa.string(), nullable=False), pa.field("relative_path", pa.string()),
              pa.field("source_path", pa.string()), pa.field("sha256", pa.string()),
              pa.field("duration_seconds", pa.float64()), pa.field("n_windows", pa.int32()),
              pa.field("model", pa.string()), pa.field("config_key", pa.string())]
    windows = [pa.field("track_id", pa.string(), nullable=False), pa.field("window_index", pa.int32()),
               pa.field("start_seconds", pa.float64()), pa.field("end_seconds", pa.float64())]
    vectors = _vector_fields(reader, layer)
    encoded = {METADATA_KEY: json.dumps(metadata, sort_keys=True).encode("utf-8")}
    return {"tracks": pa.schema(tracks + vectors, metadata=encoded),
            "windows": pa.schema(windows + vectors, metadata=encoded)}


def _vector_columns(array: np.ndarray, layer: Layer) -> list["pa.Array"]:
    """Embeddings float32 [n, n_states, hidden] ("all": one column per state) or [n, hidden] as Arrow columns of
    fixed-size lists."""
    import pyarrow as pa

    def column(matrix: np.ndarray) -> pa.Array:
        flat = np.ascontiguousarray(matrix, dtype=np.float32).reshape(-1)
        return pa.FixedSizeListArray.from_arrays(pa.array(flat), matrix.shape[-1])

    if layer == LAYER_ALL:
        return [column(array[:, state, :]) for state in range(array.shape[1])]
    return [column(array)]


def _check_shape(reader: StoreReader, track: TrackInfo, array: np.ndarray, layer: Layer, what: str) -> None:
    states = (reader.n_states,) if layer == LAYER_ALL else ()
    if array.shape[1:] != (*states, reader.hidden_size):
        raise StoreError(f"the {what} features of {track.relative_path} (dataset {reader.dataset!r}) have shape "
                         f"{list(array.shape)}, the dataset's provenance says {reader.n_states} hidden states of "
                         f"{reader.hidden_size}: run `mess-ai check --store {reader.store_root}`")


def _window_batches(reader: StoreReader, tracks: Sequence[TrackInfo], layer: Layer, schema: "pa.Schema",
                    counts: dict[str, int]) -> Iterator["pa.Table"]:
    """The windows of ``tracks`` as tables of about ``_ROW_GROUP_BYTES`` of vectors each; ``counts`` gets each
    track's number of windows."""
    import pyarrow as pa

    pending: list[tuple[TrackInfo, np.ndarray, np.ndarray]] = []
    size = 0
    for track in tracks:
        segments = reader.segments(track.track_id, layer)
        _check_shape(reader, track, segments, layer, "segments")
        times = reader.window_times(track.track_id, stored_windows=len(segments))
        counts[track.track_id] = len(times)
        pending.append((track, segments, times))
        size += segments.nbytes
        if size >= _ROW_GROUP_BYTES or track is tracks[-1]:
            ids = [t.track_id for t, s, _ in pending for _ in range(len(s))]
            indexes = np.concatenate([np.arange(len(s), dtype=np.int32) for _, s, _ in pending])
            all_times = np.concatenate([t for _, _, t in pending])
            vectors = _vector_columns(np.concatenate([s for _, s, _ in pending]), layer)
            yield pa.Table.from_arrays([pa.array(ids, pa.string()), pa.array(indexes),
                                        pa.array(np.ascontiguousarray(all_times[:, 0])),
                                        pa.array(np.ascontiguousarray(all_times[:, 1])), *vectors],
                                       schema=schema)
            pending, size = [], 0


def _write_part(reader: StoreReader, folder: Path, name: str, tracks: Sequence[TrackInfo], layer: Layer,
                schemas: dict[str, "pa.Schema"], digest: str) -> dict[str, Any]:
    """Write one part's windows, then its tracks, each file atomically; returns its record for the index."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    paths = {table: f"{table}/{name}.parquet" for table in TABLES}
    counts: dict[str, int] = {}
    with atomic_target(folder / paths["windows"]) as temp:
        with pq.ParquetWriter(temp, schemas["windows"]) as writer:
            for batch in _window_batches(reader, tracks, layer, schemas["windows"], counts):
                writer.write_table(batch)
    aggregated = reader.aggregated(layer, [track.track_id for track in tracks])
    for track, array in zip(tracks, aggregated):
        _check_shape(reader, track, array[None], layer, "aggregated")
    model = reader.provenance.get("model")
    columns = [
        pa.array([t.track_id for t in tracks], pa.string()),
        pa.array([t.relative_path for t in tracks], pa.string()),
        pa.array([t.source_path for t in tracks], pa.string()),
        pa.array([t.sha256 for t in tracks], pa.string()),
        pa.array([t.duration_seconds for t in tracks], pa.float64()),
        pa.array([counts[t.track_id] for t in tracks], pa.int32()),
        pa.array([model] * len(tracks), pa.string()),
        pa.array([t.config_key for t in tracks], pa.string()),
        *_vector_columns(aggregated, layer),
    ]
    with atomic_target(folder / paths["tracks"]) as temp:
        pq.write_table(pa.Table.from_arrays(columns, schema=schemas["tracks"]), temp)
    return {"digest": digest, "tracks": {t.track_id: [t.sha256, t.config_key] for t in tracks},
            "n_tracks": len(tracks), "n_windows": sum(counts.values()),
            "files": {table: {"path": path, "bytes": os.path.getsize(folder / path)} for table, path in paths.items()}}
