"""Per-track locks, so two runs on one store never write the same track at once.

``fcntl.flock`` locks belong to an open file description: the kernel drops them when the process dies,
so a killed run never leaves a stale lock behind.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from mess_ai.errors import TrackBusyError


class TrackLock:
    """An exclusive, non-blocking lock on one track of one dataset (a file under ``<dataset>/.locks/``)."""

    def __init__(self, lock_dir: Path, track_id: str) -> None:
        self.path = Path(lock_dir) / f"{track_id}.lock"
        self.track_id = track_id
        self._fd: int | None = None

    def acquire(self, blocking: bool = False) -> None:
        """Take the lock; raises TrackBusyError when another process holds it (unless ``blocking``)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
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
