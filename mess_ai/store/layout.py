"""The feature store on disk: ``<store>/<dataset>/{raw,segments,aggregated}/<track_id>.npy``.

Beside the scales: ``provenance.json`` (what produced the features), ``.locks/`` (per-track locks) and the
store-wide manifest (``<store>/manifest.sqlite`` unless another SQLAlchemy URL is given).
"""

from __future__ import annotations

import functools
import io
import json
import os
import re
import secrets
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from mess_ai.errors import StoreError
from mess_ai.store.atomic import (
    TEMP_MARKER,
    atomic_npy_memmap,
    atomic_target,
    atomic_write_json,
    fsync_dir,
    read_npy_header,
    target_of_temp,
)
from mess_ai.store.lock import ClaimedTrackLock, TrackLock
from mess_ai.store.manifest import Manifest, sqlite_url

SCALES = ("raw", "segments", "aggregated")
# A claim left by a worker that died is taken over after this long (a live worker finishes a track far sooner).
CLAIM_TTL_SECONDS = 3600.0
MANIFEST_FILE = "manifest.sqlite"
PROVENANCE_FILE = "provenance.json"
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,99}$")


def check_dataset_name(name: str) -> str:
    if not _SAFE_NAME.fullmatch(name) or ".." in name:
        raise ValueError(
            f"dataset name {name!r} is not usable as a folder name: use letters, digits, '.', '_' and '-' "
            "(at most 100 characters, not starting with '.' or '-')"
        )
    return name


# What ``segments`` and ``aggregated`` hold.
FEATURE_DTYPE = np.dtype(np.float32)


@functools.lru_cache(maxsize=4096)
def npy_size(shape: tuple[int, ...], dtype: np.dtype) -> int:
    """Bytes of the ``.npy`` file ``np.save`` writes for a C-ordered array of ``shape`` and ``dtype``: the header
    numpy writes for it, then the data."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape})
    return header.tell() + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize


@dataclass(frozen=True)
class ExpectedShapes:
    """What a track's files must look like: ``segments`` [n_windows, n_states, hidden], ``aggregated`` [n_states, hidden]."""

    n_windows: int
    n_states: int
    hidden: int

    @property
    def segments(self) -> tuple[int, ...]:
        return (self.n_windows, self.n_states, self.hidden)

    @property
    def aggregated(self) -> tuple[int, ...]:
        return (self.n_states, self.hidden)


class FeatureStore:
    """One dataset of a store: where its files live, and how they are written, read and locked."""

    def __init__(self, root: str | Path, dataset: str, manifest_url: str | None = None) -> None:
        self.root = Path(root).absolute()
        self.dataset = check_dataset_name(dataset)
        self.dataset_dir = self.root / self.dataset
        self.lock_dir = self.dataset_dir / ".locks"
        try:
            self.dataset_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create the store folder {self.dataset_dir}: {exc.strerror}") from exc
        if not os.access(self.dataset_dir, os.W_OK):
            raise StoreError(f"the store folder {self.dataset_dir} is not writable")
        self.manifest = Manifest(manifest_url or sqlite_url(str(self.root / MANIFEST_FILE)))
        # Identifies this process's claims on tracks in the manifest.
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"

    def close(self) -> None:
        self.manifest.close()

    # --- paths -------------------------------------------------------------------------------------------
    def path(self, scale: str, track_id: str) -> Path:
        if scale not in SCALES:
            raise ValueError(f"unknown scale {scale!r}; scales are {', '.join(SCALES)}")
        return self.dataset_dir / scale / f"{track_id}.npy"

    @property
    def provenance_path(self) -> Path:
        return self.dataset_dir / PROVENANCE_FILE

    # --- provenance --------------------------------------------------------------------------------------
    def _provenance_lock(self) -> TrackLock:
        # Not a track id: those never start with a dot.
        return TrackLock(self.lock_dir, ".provenance")

    def write_provenance(self, provenance: dict[str, Any]) -> None:
        lock = self._provenance_lock()
        lock.acquire(blocking=True)
        try:
            atomic_write_json(self.provenance_path, provenance)
        except OSError as exc:
            raise StoreError(f"cannot write {self.provenance_path}: {exc.strerror or exc}") from exc
        finally:
            lock.release()

    def read_provenance(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.provenance_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None

    # --- tracks ------------------------------------------------------------------------------------------
    def lock(self, track_id: str) -> ClaimedTrackLock:
        """The track's lock: a local file lock plus a claim in the manifest (other machines)."""
        return ClaimedTrackLock(TrackLock(self.lock_dir, track_id), self.manifest, self.dataset, self.owner,
                                CLAIM_TTL_SECONDS)

    def outputs_valid(self, track_id: str, shapes: ExpectedShapes, keep_raw: bool) -> bool:
        """Cheap check that a track's files exist with the expected shapes: a ``segments`` or ``aggregated`` file
        of exactly the size ``np.save`` gives an array of its shape passes on its size alone (one stat, which is
        what a no-op run over 100,000 tracks can afford); any other size has its header read, shape and dtype
        compared and its length checked against the header. A missing or truncated file never passes. (A raw file,
        whose frame count no row records, always has its header read.)"""
        folder = os.fspath(self.dataset_dir)
        try:
            for scale, shape in (("segments", shapes.segments), ("aggregated", shapes.aggregated)):
                # A plain string: building a Path costs more than the stat, 200,000 times in such a run.
                path = f"{folder}/{scale}/{track_id}.npy"
                if os.stat(path).st_size != npy_size(shape, FEATURE_DTYPE):
                    found, dtype = read_npy_header(path)
                    if found != shape or dtype != FEATURE_DTYPE:
                        return False
            if keep_raw:
                raw_shape, _ = read_npy_header(self.path("raw", track_id))
                if raw_shape[:2] != (shapes.n_windows, shapes.n_states) or raw_shape[3:] != (shapes.hidden,):
                    return False
        except (OSError, ValueError):
            return False
        return True

    def write_segments(self, track_id: str, segments: np.ndarray, aggregated: np.ndarray,
                       sync_dirs: bool = True) -> None:
        """segments: float32 [n_windows, n_states, hidden]; aggregated: float32 [n_states, hidden].

        Both are written in full (and fsynced) before either is renamed into place, so a write that fails (disk
        full) leaves the track's earlier features as they were, never a new segments file beside an old
        aggregated one. ``sync_dirs`` False leaves the renames' durability to ``sync_feature_dirs``, called once
        for the tracks written together."""
        with atomic_target(self.path("segments", track_id), sync_dirs) as segments_temp, \
                atomic_target(self.path("aggregated", track_id), sync_dirs) as aggregated_temp:
            for temp, array in ((segments_temp, segments), (aggregated_temp, aggregated)):
                with open(temp, "wb") as fh:
                    np.save(fh, np.ascontiguousarray(array.astype(np.float32, copy=False)), allow_pickle=False)

    def sync_feature_dirs(self) -> None:
        """Make the renames of ``write_segments(..., sync_dirs=False)`` durable: one fsync per scale folder."""
        for scale in ("segments", "aggregated"):
            fsync_dir(self.dataset_dir / scale)

    def raw_writer(self, track_id: str, shape: tuple[int, ...]):
        """A memory map for raw: float16 [n_windows, n_states, frames, hidden], in place only once complete."""
        return atomic_npy_memmap(self.path("raw", track_id), shape, np.float16)

    def remove_outputs(self, track_id: str) -> None:
        for scale in SCALES:
            self.path(scale, track_id).unlink(missing_ok=True)

    def feature_files(self) -> Iterator[tuple[str, Path]]:
        """Every ``(scale, path)`` of a finished feature file in this dataset."""
        for scale in SCALES:
            folder = self.dataset_dir / scale
            if folder.is_dir():
                for entry in sorted(folder.iterdir()):
                    if entry.suffix == ".npy" and not entry.name.startswith("."):
                        yield scale, entry

    def temp_files(self, track_id: str | None = None) -> list[Path]:
        """Temporary files left by writes that never finished (a killed process)."""
        found = []
        for scale in SCALES:
            folder = self.dataset_dir / scale
            if not folder.is_dir():
                continue
            pattern = f".{track_id}.npy{TEMP_MARKER}*" if track_id else f".*{TEMP_MARKER}*"
            found.extend(sorted(folder.glob(pattern)))
        found.extend(sorted(self.dataset_dir.glob(f".*{TEMP_MARKER}*")) if track_id is None else [])
        return found

    def _lock_for_temp(self, target: Path) -> TrackLock | ClaimedTrackLock:
        return self._provenance_lock() if target.parent == self.dataset_dir else self.lock(target.stem)

    def temp_in_use(self, temp: Path) -> bool:
        """True while the process that writes ``temp`` is alive and holds the lock of what it writes."""
        target = target_of_temp(temp)
        return target is not None and self._lock_for_temp(target).held_elsewhere()

    def sweep_temp_files(self) -> list[Path]:
        """Remove temporary files whose track no running process holds; returns what was removed."""
        removed = []
        for temp in self.temp_files():
            target = target_of_temp(temp)
            if target is None:
                continue
            lock = self._lock_for_temp(target)
            try:
                lock.acquire()
            except StoreError:
                continue
            try:
                temp.unlink(missing_ok=True)
                removed.append(temp)
            finally:
                lock.release()
        return removed
