"""A decoding process: ``python -m mess_ai.audio.decode_worker PARENT_PID`` decodes files with ``load_mono`` for the
run that started it, one request at a time, and hands the samples back through shared memory.

It speaks length-prefixed JSON over its stdin (requests) and stdout (replies), which can carry no code, and
imports only numpy, soundfile, soxr and the decoding modules: a process started this way (not by multiprocessing's spawn or
forkserver, which re-import the parent's ``__main__``: under a Prefect worker, Prefect's engine) is ready in a
fraction of a second. It decodes a file only while it is the very file the parent hashed (``identity``: inode,
size, mtime, ctime, before and after decoding), else it answers ``changed`` and the parent decodes that file from
its own descriptor. It ends when its stdin closes, and on Linux when the thread of the parent that started it
ends (``PR_SET_PDEATHSIG``), so a killed run never leaves one behind.
"""

from __future__ import annotations

import json
import mmap
import os
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
from mess_ai.errors import AudioError, InputError

_LENGTH = struct.Struct(">I")
_PR_SET_PDEATHSIG = 1


def write_message(stream: IO[bytes], message: Any) -> None:
    """One message: the length of its JSON (4 bytes, big-endian), then the JSON (ASCII: a file name's bytes that
    are not UTF-8 travel as the escaped surrogates Python names them with)."""
    data = json.dumps(message).encode("ascii")
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
    return json.loads(data)


def error_fields(exc: BaseException) -> dict[str, Any]:
    """What the parent needs to raise ``exc`` again as the in-process path would have raised it: mess-ai's input
    errors with their file, reason and stage, OSErrors with their errno (which picks their subclass), any other
    error as a RuntimeError naming its class."""
    if isinstance(exc, InputError):
        return {"class": type(exc).__name__, "path": exc.path, "reason": exc.reason, "stage": exc.stage}
    if isinstance(exc, OSError):
        return {"class": "OSError", "errno": exc.errno, "strerror": exc.strerror, "filename": exc.filename,
                "message": str(exc)}
    return {"class": "RuntimeError", "message": f"{type(exc).__name__}: {exc}"}


def error_from(fields: dict[str, Any]) -> BaseException:
    """The exception ``error_fields`` described."""
    input_errors = {cls.__name__: cls for cls in (InputError, AudioError)}
    if fields["class"] in input_errors:
        return input_errors[fields["class"]](fields["path"], fields["reason"], fields["stage"])
    if fields["class"] == "OSError":
        if fields["errno"] is None:
            return OSError(fields["message"])
        return OSError(fields["errno"], fields["strerror"], *(() if fields["filename"] is None
                                                              else (fields["filename"],)))
    return RuntimeError(fields["message"])


# Shared memory straight through _posixshmem, which multiprocessing.shared_memory is built on: before Python 3.13
# a SharedMemory registers every segment with a resource-tracker process of its own (one more process per worker
# and per run), which unlinks at its exit the segments it thinks leaked, and warns about each.

SEGMENT_PREFIX = "mess-ai-"


def write_segment(samples: np.ndarray, owner_pid: int) -> str:
    """A new shared-memory segment holding ``samples`` (float32 [n]), named after the process it is for; its name.
    The reader unlinks it (or ``sweep_segments``, once that process is dead)."""
    name = f"/{SEGMENT_PREFIX}{owner_pid}-{secrets.token_hex(8)}"
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


def sweep_segments(folder: str = "/dev/shm") -> list[str]:
    """Remove the segments whose run is dead: a worker killed with its run (or a run killed between a worker's
    reply and its read) leaves the samples it decoded in shared memory, which is RAM, until the machine restarts.
    Returns the names removed; nothing where shared memory is not a folder (not Linux)."""
    removed = []
    try:
        names = [name for name in os.listdir(folder) if name.startswith(SEGMENT_PREFIX)]
    except OSError:
        return removed
    for name in names:
        owner = name[len(SEGMENT_PREFIX):].split("-", 1)[0]
        if not owner.isdigit() or _alive(int(owner)):
            continue
        unlink_segment(f"/{name}")
        removed.append(name)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's: alive
        return True
    return True


def unlink_segment(name: str) -> None:
    """Remove a segment nobody will read (its file was given up on meanwhile)."""
    try:
        _posixshmem.shm_unlink(name)
    except FileNotFoundError:
        pass


def decode(path: str, expected: list[int], sampling_rate: int, limits: dict[str, Any], owner_pid: int) -> list:
    """One request: ["decoded", segment name, n_samples, seconds], ["changed", why] when the file is not the one
    the parent hashed (or cannot be opened here: the parent's descriptor may still read it), or ["failed", the
    ``error_fields`` of what ``load_mono`` raised]. ``expected``: the file's ``identity``; ``limits``: the fields
    of an ``AudioLimits``."""
    started = time.perf_counter()
    expected_identity = tuple(expected)
    try:
        opening = open_audio(path)
        opened = opening.__enter__()
    except Exception as exc:  # noqa: BLE001 - the parent's own descriptor decides what is wrong with the file
        return ["changed", f"it could not be opened again ({exc})"]
    try:
        if identity(opened.stat) != expected_identity:
            return ["changed", "it changed after it was hashed"]
        try:
            samples = load_mono(opened, sampling_rate, limits=AudioLimits(**limits))
        except Exception as exc:  # noqa: BLE001 - handed back, to be recorded as the in-process path records it
            return ["failed", error_fields(exc)]
        if identity(os.fstat(opened.fd)) != expected_identity:
            return ["changed", "it changed while it was decoded"]
        name = write_segment(samples, owner_pid)
        return ["decoded", name, len(samples), time.perf_counter() - started]
    finally:
        opening.__exit__(None, None, None)


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
    parent_pid = int(sys.argv[1])
    while (request := read_message(requests)) is not None:
        write_message(replies, decode(*request, owner_pid=parent_pid))


if __name__ == "__main__":
    main()
