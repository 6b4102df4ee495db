"""Per-track locks, so two runs on one store never write the same track at once.

``fcntl.flock`` locks belong to an open file description: the kernel drops them when the process dies,
so a killed run never leaves a stale lock behind.
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

from mess_ai.errors import StoreError, TrackBusyError

if TYPE_CHECKING:
    from mess_ai.store.manifest import Manifest


class TrackLock:
    """An exclusive, non-blocking lock on one track of one dataset (a file under ``<dataset>/.locks/``)."""

    def __init__(self, lock_dir: Path, track_id: str) -> None:
        self.path = Path(lock_dir) / f"{track_id}.lock"
        self.track_id = track_id
        self._fd: int | None = None

    def acquire(self, blocking: bool = False) -> None:
        """Take the lock; raises TrackBusyError when another process holds it (unless ``blocking``)."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise StoreError(f"cannot create the lock file {self.path}: {exc.strerror or exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if blocking else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise TrackBusyError(f"track {self.track_id} is being written by another run right now") from None
        self._fd = fd

    def held_elsewhere(self) -> bool:
        """True when another process (or another lock object of this one) holds the lock right now."""
        try:
            self.acquire()
        except TrackBusyError:
            return True
        self.release()
        return False

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "TrackLock":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class ClaimedTrackLock:
    """The per-track file lock plus a claim in the manifest, so processes on other machines that share the store
    and the manifest (PostgreSQL) never extract the same track at once. Same interface as ``TrackLock``."""

    def __init__(self, file_lock: TrackLock, manifest: "Manifest", dataset: str, owner: str, ttl_seconds: float,
                 poll_seconds: float = 1.0) -> None:
        self.file_lock = file_lock
        self.manifest = manifest
        self.dataset = dataset
        self.track_id = file_lock.track_id
        self.owner = owner
        self.ttl_seconds = ttl_seconds
        self.poll_seconds = poll_seconds
        self._claimed = False

    def acquire(self, blocking: bool = False) -> None:
        self.file_lock.acquire(blocking)
        host = self.owner.split(":", 1)[0] + ":"
        while not self.manifest.claim(self.dataset, self.track_id, self.owner, self.ttl_seconds, host):
            if not blocking:
                self.file_lock.release()
                raise TrackBusyError(f"track {self.track_id} is claimed by another worker right now")
            time.sleep(self.poll_seconds)
        self._claimed = True

    @property
    def claimed(self) -> bool:
        return self._claimed

    def claim_released(self) -> None:
        """The claim was deleted by the caller (in the transaction that settled the track): ``release`` then
        releases the file lock alone."""
        self._claimed = False

    def release(self) -> None:
        """Release the claim, then the file lock, even when the manifest cannot be written (the claim then
        expires, or is taken over at once by a process of this host: the file lock is free)."""
        try:
            if self._claimed:
                self._claimed = False
                self.manifest.release_claim(self.dataset, self.track_id, self.owner)
        finally:
            self.file_lock.release()

    def held_elsewhere(self) -> bool:
        """A live process of this host holds the file lock, or another host holds an unexpired claim (a claim of
        this host with the file lock free was left by a killed process)."""
        if self.file_lock.held_elsewhere():
            return True
        host = self.owner.split(":", 1)[0] + ":"
        return self.manifest.claimed_by_other(self.dataset, self.track_id, self.owner, ignore_prefix=host)

    def __enter__(self) -> "ClaimedTrackLock":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
