"""Open an audio file once, safely: never block on a FIFO, never follow a link swapped in, only read regular files."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import soundfile as sf

from mess_ai.errors import AudioError

_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
# O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer, forever. O_NOFOLLOW: a file replaced
# by a symlink after we looked at it is refused (ELOOP) instead of read from wherever the link points.
_OPEN_FLAGS = os.O_RDONLY | _NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)

_NOT_REGULAR = (
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a device"),
    (stat.S_ISBLK, "a device"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISDIR, "a directory"),
)


@dataclass(frozen=True)
class OpenedAudio:
    """A regular file open for reading (non-empty unless opened with ``allow_empty``): ``path`` as the caller
    named it, ``stat`` taken from ``fd``."""

    path: Path
    fd: int
    stat: os.stat_result


@contextmanager
def open_audio(path: str | Path, stage: str = "open", allow_empty: bool = False) -> Iterator[OpenedAudio]:
    """Open ``path`` once for reading and yield it as ``OpenedAudio``; the descriptor is closed on exit.

    A symlink is resolved first and its target opened without following links, so every check and read is of the
    one file the descriptor holds. Something that is not a regular file, or an empty one, raises ``AudioError``
    with ``stage``: a permanent property of the input (``allow_empty``: an empty file is opened, for hashing).
    Failures of the system (``ENOENT``, ``EACCES``, ``EIO``, ``ELOOP`` for a link swapped in meanwhile) stay
    ``OSError``: they say nothing about the bytes and are retried.
    """
    target = os.path.realpath(path) if os.path.islink(path) else path
    try:
        fd = os.open(target, _OPEN_FLAGS)
    except OSError as err:
        # A Unix socket cannot be opened at all (ENXIO): name it, as the descriptor would have.
        if err.errno == errno.ENXIO and _is_socket(target):
            raise AudioError(path, "not a regular file (a socket)", stage) from err
        raise
    try:
        file_stat = os.fstat(fd)
        if not stat.S_ISREG(file_stat.st_mode):
            raise AudioError(path, f"not a regular file ({_kind(file_stat.st_mode)})", stage)
        if file_stat.st_size == 0 and not allow_empty:
            raise AudioError(path, "empty file (0 bytes)", stage)
        if _NONBLOCK:
            # Back to blocking reads: a network file system may honour O_NONBLOCK with EAGAIN mid-decode.
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~_NONBLOCK)
        yield OpenedAudio(Path(path), fd, file_stat)
    finally:
        os.close(fd)


def open_soundfile(opened: OpenedAudio) -> sf.SoundFile:
    """libsndfile reading ``opened``'s descriptor itself, from the first byte; the descriptor stays open after.

    libsndfile takes the descriptor's current offset as the start of the file, hence the seek.
    """
    os.lseek(opened.fd, 0, os.SEEK_SET)
    try:
        return sf.SoundFile(opened.fd, closefd=False)
    except sf.SoundFileError as err:
        start = _first_mpeg_frame(opened) if "Format not recognised" in str(err) else None
        if not start:
            raise
    os.lseek(opened.fd, start, os.SEEK_SET)
    return sf.SoundFile(opened.fd, closefd=False)


def sha256_fd(fd: int, block_size: int = 1 << 20) -> str:
    """sha256 of the whole file open as ``fd``, read with positional reads: the descriptor's offset is unchanged."""
    digest = hashlib.sha256()
    offset = 0
    while block := os.pread(fd, block_size, offset):
        digest.update(block)
        offset += len(block)
    return digest.hexdigest()


def identity(file_stat: os.stat_result) -> tuple[int, ...]:
    """What changes whenever a file's bytes may have: a new inode (replaced by a rename), a new size, mtime or
    change time (ctime cannot be set back by a copy tool)."""
    return (file_stat.st_dev, file_stat.st_ino, file_stat.st_size, file_stat.st_mtime_ns, file_stat.st_ctime_ns)


# Given a name, libsndfile hands a *.mp3 it does not recognise to mpg123, which skips up to 64 KiB of junk (zero
# padding, a stream cut mid-frame) before the first frame. Through a descriptor libsndfile has no name, so the
# skipping is done here: it is handed the stream from the first MPEG frame header.
_MP3_JUNK_BYTES = 1 << 16


def _first_mpeg_frame(opened: OpenedAudio) -> int | None:
    """Offset of the first MPEG audio frame header in the first 64 KiB of a *.mp3, by libsndfile's own test."""
    if opened.path.suffix.lower() != ".mp3":
        return None
    head = os.pread(opened.fd, _MP3_JUNK_BYTES + 3, 0)
    at = head.find(0xFF)
    while 0 <= at < len(head) - 3:
        b1, b2 = head[at + 1], head[at + 2]
        # Frame sync, then a version, layer, bitrate and sample rate that are not reserved values.
        if b1 & 0xE0 == 0xE0 and b1 & 0x18 != 0x08 and b1 & 0x06 and b2 & 0xF0 != 0xF0 and b2 & 0x0C != 0x0C:
            return at
        at = head.find(0xFF, at + 1)
    return None


def _kind(mode: int) -> str:
    return next((name for is_kind, name in _NOT_REGULAR if is_kind(mode)), "another kind of file")


def _is_socket(path: str | Path) -> bool:
    try:
        return stat.S_ISSOCK(os.lstat(path).st_mode)
    except OSError:
        return False
