"""Atomic file writes: a temporary sibling, fsync, then ``os.replace``, so a reader never sees half a file.

A process killed mid-write leaves at most a temporary file whose name marks it as such (``TEMP_MARKER``);
those are swept by the next run that holds the track's lock, and reported by the integrity check.
"""

from __future__ import annotations

import io
import json
import os
import secrets
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np

TEMP_MARKER = ".tmp-"


def temp_path_for(path: Path) -> Path:
    """A unique temporary sibling of ``path``: hidden, and carrying the target's name (``.<name>.tmp-<random>``)."""
    return path.with_name(f".{path.name}{TEMP_MARKER}{os.getpid()}-{secrets.token_hex(4)}")


def target_of_temp(temp: Path) -> Path | None:
    """The file a temporary sibling was meant to become, or None when ``temp`` is not one of ours."""
    name = temp.name
    if not name.startswith(".") or TEMP_MARKER not in name:
        return None
    return temp.with_name(name[1:name.rindex(TEMP_MARKER)])


def fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_target(path: str | Path, sync_dir: bool = True) -> Iterator[Path]:
    """Yield a temporary path to write; on success it is fsynced and renamed onto ``path``, on error removed.
    ``sync_dir`` False leaves the rename's durability to the caller (``fsync_dir`` of the folder, once for many
    files)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = temp_path_for(path)
    try:
        yield temp
        with open(temp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    if sync_dir:
        fsync_dir(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_target(path) as temp:
        with open(temp, "wb") as fh:
            fh.write(data)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode("utf-8"))


def atomic_save_npy(path: str | Path, array: np.ndarray) -> None:
    """Save one array as ``.npy`` atomically (never pickled)."""
    with atomic_target(path) as temp:
        with open(temp, "wb") as fh:
            np.save(fh, np.ascontiguousarray(array), allow_pickle=False)


@contextmanager
def atomic_npy_memmap(path: str | Path, shape: tuple[int, ...], dtype: np.dtype | str) -> Iterator[np.memmap]:
    """Yield a writable memory map of a new ``.npy`` file; it appears at ``path`` only when the block completes.

    Used for arrays too large to hold in memory (the raw scale: about 10 GB per audio hour).
    """
    with atomic_target(path) as temp:
        array = np.lib.format.open_memmap(temp, mode="w+", dtype=np.dtype(dtype), shape=shape)
        # The map's file is sparse: on a full disk a page write would kill the process (SIGBUS). Reserving the
        # blocks first turns that into an ENOSPC here, which the run records.
        with open(temp, "rb+") as fh:
            os.posix_fallocate(fh.fileno(), 0, os.fstat(fh.fileno()).st_size)
        try:
            yield array
            array.flush()
        finally:
            del array


def load_npy(path: str | Path, mmap: bool = False) -> np.ndarray:
    """Load a feature file; pickled objects are refused."""
    return np.load(path, allow_pickle=False, mmap_mode="r" if mmap else None)


def read_npy_header(path: str | Path) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of a ``.npy`` file from its header alone (cheap: no data read)."""
    with open(path, "rb") as fh:
        version = np.lib.format.read_magic(fh)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(fh)
        elif version == (2, 0):
            shape, _, dtype = np.lib.format.read_array_header_2_0(fh)
        else:
            raise ValueError(f"{path}: unsupported .npy format version {version}")
        expected = fh.tell() + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        fh.seek(0, io.SEEK_END)
        if fh.tell() != expected:
            raise ValueError(f"{path}: file is {fh.tell()} bytes, its header promises {expected}")
    if dtype.hasobject:
        raise ValueError(f"{path}: holds Python objects, which feature files never do")
    return tuple(shape), dtype
