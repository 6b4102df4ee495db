"""Host-wide locks on model devices: two runs on one machine never run the model on the same GPU at once, whatever
the count of the Prefect concurrency limit says.

A device is locked with ``fcntl.flock`` on a file named after it in a folder of this host
(``$MESS_AI_CACHE_DIR/device-locks/<host>``, else ``~/.cache/mess-ai/device-locks/<host>``): the kernel drops the
lock when its process dies, so a killed run never leaves a GPU locked. Within a process, model work waiting for a
device is woken the moment another chunk gives one back; a device another process holds is tried again every
``POLL_SECONDS``. ``flock`` locks belong to an open file description, so two runs in one process exclude each
other too.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import threading
from pathlib import Path
from typing import Iterator, Mapping

from mess_ai.errors import ModelError
from mess_ai.features.identity import CACHE_DIR_ENV

POLL_SECONDS = 0.2

# The devices this process runs model work on right now (by lock name, or by device name for those without one).
_in_use: set[str] = set()
_changed = threading.Condition()


def lock_folder() -> Path:
    """This host's folder of device locks."""
    cache = Path(os.environ.get(CACHE_DIR_ENV) or Path.home() / ".cache" / "mess-ai")
    return cache / "device-locks" / socket.gethostname()


@contextlib.contextmanager
def hold_device(devices: Mapping[str, str | None]) -> Iterator[str]:
    """Wait for one of ``devices`` to be free on this host, hold it for the block, and give its name.

    ``devices`` maps each device's name (in the order to try them) to the name of its host-wide lock, or to None
    for a device that is only kept to one model work at a time within this process (the CPU).
    """
    if not devices:
        raise ValueError("no device to hold")
    folder = lock_folder()
    with _changed:
        while True:
            free_here = [name for name in devices if (devices[name] or name) not in _in_use]
            for name in free_here:
                lock = devices[name]
                fd = _try_lock(folder / f"{lock}.lock") if lock else None
                if lock is None or fd is not None:
                    held, key = name, lock or name
                    _in_use.add(key)
                    break
            else:
                # Every device busy in this process: a chunk giving one back wakes us. Some held by other processes:
                # they say nothing when they let go, so look again shortly.
                _changed.wait(POLL_SECONDS if free_here else None)
                continue
            break
    try:
        yield held
    finally:
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
        with _changed:
            _in_use.discard(key)
            _changed.notify_all()


def _try_lock(path: Path) -> int | None:
    """A descriptor of ``path`` holding its exclusive lock, or None when someone else holds it."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise ModelError(f"cannot create the device lock {path} ({exc.strerror or exc}): the model cannot be run "
                         f"without it; point {CACHE_DIR_ENV} at a folder of this host that can be written") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd
