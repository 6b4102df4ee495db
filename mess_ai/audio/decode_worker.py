"""A decoding process: ``python -m mess_ai.audio.decode_worker PARENT_PID`` decodes files with ``load_mono`` for the
run that started it, one request at a time, and hands the samples back through shared memory.

It speaks length-prefixed pickles over its stdin (requests) and stdout (replies), and imports only numpy,
soundfile, soxr and the decoding modules: a process started this way (not by multiprocessing's spawn or
forkserver, which re-import the parent's ``__main__``: under a Prefect worker, Prefect's engine) is ready in a
fraction of a second. It decodes a file only while it is the very file the parent hashed (``identity``: inode,
size, mtime, ctime, before and after decoding), else it answers ``changed`` and the parent decodes that file from
its own descriptor. It ends when its stdin closes, and on Linux when the thread of the parent that started it
ends (``PR_SET_PDEATHSIG``), so a killed run never leaves one behind.
"""

from __future__ import annotations

import mmap
import os
import pickle
import secrets
import signal
import struct
import sys
import time
from typing import IO, Any

import _posixshmem
import numpy as np

from mess_ai.audio.loading import load_mono
from mess_ai.audio.opening import identity, open_audio
from mess_ai.audio.validation import AudioLimits

_LENGTH = struct.Struct(">I")
_PR_SET_PDEATHSIG = 1


def write_message(stream: IO[bytes], message: Any) -> None:
    """One message: its pickle's length (4 bytes, big-endian), then the pickle."""
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(_LENGTH.pack(len(data)) + data)
    stream.flush()


def read_message(stream: IO[bytes]) -> Any:
    """The next message, or None when the other side has closed the pipe (also mid-message: it died)."""
    header = stream.read(_LENGTH.size)
    if len(header) < _LENGTH.size:
        return None
    size, = _LENGTH.unpack(header)
    data = stream.read(size)
    if len(data) < size:
        return None
    return pickle.loads(data)


# Shared memory straight through _posixshmem, which multiprocessing.shared_memory is built on: before Python 3.13
# a SharedMemory registers every segment with a resource-tracker process of its own (one more process per worker
# and per run), which unlinks at its exit the segments it thinks leaked, and warns about each.

def write_segment(samples: np.ndarray) -> str:
    """A new shared-memory segment holding ``samples`` (float32 [n]); its name. The reader unlinks it."""
    name = f"/mess-ai-{secrets.token_hex(8)}"
    fd = _posixshmem.shm_open(name, os.O_CREAT | os.O_EXCL | os.O_RDWR, mode=0o600)
    try:
        os.ftruncate(fd, samples.nbytes)
        segment = mmap.mmap(fd, samples.nbytes)
        view = np.frombuffer(segment, dtype=np.float32)
        view[:] = samples
        del view  # the mapping can only be closed once no array looks into it
        segment.close()
    except BaseException:
        _posixshmem.shm_unlink(name)
        raise
    finally:
        os.close(fd)
    return name


def read_segment(name: str, n_samples: int) -> np.ndarray:
    """float32 [n_samples] from the segment ``name``, unlinked at once: the array maps the segment itself (no copy),
    and its memory goes when the array does; nothing is left in /dev/shm whatever happens next."""
    fd = _posixshmem.shm_open(name, os.O_RDWR, mode=0o600)
    try:
        _posixshmem.shm_unlink(name)
        return np.frombuffer(mmap.mmap(fd, n_samples * 4), dtype=np.float32)
    finally:
        os.close(fd)


def unlink_segment(name: str) -> None:
    """Remove a segment nobody will read (its file was given up on meanwhile)."""
    try:
        _posixshmem.shm_unlink(name)
    except FileNotFoundError:
        pass


def decode(path: str, expected: tuple[int, ...], sampling_rate: int, limits: AudioLimits) -> tuple:
    """One request: ("decoded", segment name, n_samples, seconds), ("changed", why) when the file is not the one
    the parent hashed (or cannot be opened here: the parent's descriptor may still read it), or ("failed", the
    exception ``load_mono`` raised)."""
    started = time.perf_counter()
    try:
        opening = open_audio(path)
        opened = opening.__enter__()
    except Exception as exc:  # noqa: BLE001 - the parent's own descriptor decides what is wrong with the file
        return "changed", f"it could not be opened again ({exc})"
    try:
        if identity(opened.stat) != expected:
            return "changed", "it changed after it was hashed"
        try:
            samples = load_mono(opened, sampling_rate, limits=limits)
        except Exception as exc:  # noqa: BLE001 - handed back, to be recorded as the in-process path records it
            return "failed", _portable(exc)
        if identity(os.fstat(opened.fd)) != expected:
            return "changed", "it changed while it was decoded"
        name = write_segment(samples)
        return "decoded", name, len(samples), time.perf_counter() - started
    finally:
        opening.__exit__(None, None, None)


def _portable(exc: BaseException) -> BaseException:
    """``exc`` if it crosses the pipe as itself (mess-ai's errors, OSError and the other built-in ones do), else a
    RuntimeError with its class name and message."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:  # noqa: BLE001
        return RuntimeError(f"{type(exc).__name__}: {exc}")


def _die_with_parent(parent_pid: int) -> None:
    """Linux: be killed when the parent's thread that started us ends (the parent killed, too); and if the parent
    is already gone, end now."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:
        sys.exit(0)


def main() -> None:
    _die_with_parent(int(sys.argv[1]))
    # Ctrl-C in a terminal reaches the whole process group: the run decides when its workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    requests = sys.stdin.buffer
    # Replies get a descriptor of their own, and fd 1 becomes stderr: whatever a decoding library prints cannot
    # corrupt the reply stream.
    replies = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    while (request := read_message(requests)) is not None:
        write_message(replies, decode(*request))


if __name__ == "__main__":
    main()
