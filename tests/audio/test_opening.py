"""open_audio opens each file once and safely: hostile files (FIFOs, devices, links swapped in, unreadable files)
fail at once, as bad input or as a system failure to retry, and never hang a run."""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import hashlib
import os
import socket
import stat
import threading

import numpy as np
import pytest

import mess_ai.audio.opening as opening
from mess_ai.audio import OpenedAudio, identity, load_mono, open_audio, probe_audio, sha256_fd
from mess_ai.errors import AudioError
from tests.helpers.audio import write_audio, write_empty


def _open(path):
    with open_audio(path, "validate"):
        pass


ENTRY_POINTS = {
    "open_audio": _open,
    "probe_audio": probe_audio,
    "load_mono": lambda path: load_mono(path, 24000),
}


def _finishes(call, path, seconds: float = 10.0) -> BaseException | None:
    """What ``call(path)`` raised, run in a thread so that a call blocked on a FIFO fails the test instead of
    hanging it."""
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            call(path)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            outcome.append(exc)
        else:
            outcome.append(None)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))  # a writer lets a blocked reader go
        pytest.fail(f"still blocked on {path} after {seconds} s")
    return outcome[0]


def test_a_regular_file_is_opened_for_reading_with_its_stat(tmp_path):
    path = write_audio(tmp_path / "tone.wav")
    with open_audio(path) as opened:
        assert isinstance(opened, OpenedAudio)
        assert opened.path == path
        assert stat.S_ISREG(opened.stat.st_mode)
        assert identity(opened.stat) == identity(os.stat(path))
        flags = fcntl.fcntl(opened.fd, fcntl.F_GETFL)
        assert flags & os.O_ACCMODE == os.O_RDONLY
        assert not flags & os.O_NONBLOCK  # only needed while opening: reads block as usual
        assert not os.get_inheritable(opened.fd)  # O_CLOEXEC: a child process does not keep it open
        fd = opened.fd
    with pytest.raises(OSError) as caught:
        os.fstat(fd)
    assert caught.value.errno == errno.EBADF


def test_opened_audio_is_frozen(tmp_path):
    with open_audio(write_audio(tmp_path / "tone.wav")) as opened:
        with pytest.raises(dataclasses.FrozenInstanceError):
            opened.fd = 0


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_a_fifo_is_refused_at_once(tmp_path, entry):
    path = tmp_path / "pipe.wav"
    os.mkfifo(path)
    error = _finishes(ENTRY_POINTS[entry], path)
    assert isinstance(error, AudioError), error
    assert error.reason == "not a regular file (a FIFO)"
    assert error.path == str(path)


def test_directory_device_and_socket_are_refused(tmp_path):
    (tmp_path / "folder.wav").mkdir()
    listener = socket.socket(socket.AF_UNIX)
    try:
        listener.bind(str(tmp_path / "socket.wav"))
        for path, kind in [(tmp_path / "folder.wav", "a directory"), ("/dev/null", "a device"),
                           (tmp_path / "socket.wav", "a socket")]:
            with pytest.raises(AudioError) as caught:
                _open(path)
            assert (caught.value.reason, caught.value.stage) == (f"not a regular file ({kind})", "validate")
    finally:
        listener.close()


def test_an_empty_file_is_refused(tmp_path):
    with pytest.raises(AudioError) as caught:
        _open(write_empty(tmp_path / "empty.wav"))
    assert caught.value.reason == "empty file (0 bytes)"


def test_a_symlink_to_a_regular_file_opens_its_target(tmp_path):
    target = write_audio(tmp_path / "real.wav", seconds=1.5, sample_rate=24000, seed=1)
    (tmp_path / "middle.wav").symlink_to("real.wav")
    link = tmp_path / "link.wav"
    link.symlink_to("middle.wav")  # a chain of links resolves too
    with open_audio(link) as opened:
        assert opened.path == link  # errors name the file as the caller knows it
        assert identity(opened.stat) == identity(os.stat(target))
    assert probe_audio(link) == probe_audio(target)
    np.testing.assert_array_equal(load_mono(link, 24000), load_mono(target, 24000))


def test_a_link_swapped_in_after_resolving_is_refused_by_the_os(tmp_path, monkeypatch):
    write_audio(tmp_path / "real.wav")
    (tmp_path / "private.wav").write_bytes(b"not for us")
    link = tmp_path / "link.wav"
    link.symlink_to("real.wav")
    resolve = os.path.realpath

    def resolve_then_swap(path, *args, **kwargs):
        resolved = resolve(path, *args, **kwargs)
        # Between resolving and opening, someone replaces the target with a link elsewhere.
        (tmp_path / "swap.wav").symlink_to("private.wav")
        os.replace(tmp_path / "swap.wav", resolved)
        return resolved

    monkeypatch.setattr(os.path, "realpath", resolve_then_swap)
    with pytest.raises(OSError) as caught:
        _open(link)
    assert caught.value.errno == errno.ELOOP  # O_NOFOLLOW: the link is not followed to private.wav


def test_a_link_is_never_followed_by_the_open_itself(tmp_path):
    write_audio(tmp_path / "real.wav")
    (tmp_path / "link.wav").symlink_to("real.wav")
    with pytest.raises(OSError) as caught:
        os.open(tmp_path / "link.wav", opening._OPEN_FLAGS)
    assert caught.value.errno == errno.ELOOP


def test_missing_files_and_broken_links_are_os_errors(tmp_path):
    (tmp_path / "dangling.wav").symlink_to("missing.wav")
    (tmp_path / "ping.wav").symlink_to("pong.wav")
    (tmp_path / "pong.wav").symlink_to("ping.wav")
    for name in ("gone.wav", "dangling.wav"):
        with pytest.raises(FileNotFoundError):
            _open(tmp_path / name)
    with pytest.raises(OSError) as caught:
        _open(tmp_path / "ping.wav")
    assert caught.value.errno == errno.ELOOP


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_permission_denied_is_an_os_error_not_bad_audio(tmp_path, monkeypatch, entry):
    # Injected: as root (CAP_DAC_OVERRIDE) a chmod 000 file opens anyway; see the test below for the real thing.
    path = write_audio(tmp_path / "locked.wav")
    real_open = os.open

    def denied(file, *args, **kwargs):
        if os.fspath(file) == str(path):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(opening.os, "open", denied)
    with pytest.raises(PermissionError) as caught:
        ENTRY_POINTS[entry](path)
    assert caught.value.errno == errno.EACCES


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a chmod 000 file (CAP_DAC_OVERRIDE)")
@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_an_unreadable_file_is_an_os_error(tmp_path, entry):
    path = write_audio(tmp_path / "locked.wav")
    path.chmod(0)
    try:
        with pytest.raises(PermissionError):
            ENTRY_POINTS[entry](path)
    finally:
        path.chmod(0o644)


def test_sha256_fd_hashes_the_whole_file_and_leaves_it_reusable(tmp_path):
    path = write_audio(tmp_path / "tone.flac", seconds=3.0, sample_rate=44100, channels=2, seed=4)
    expected = hashlib.sha256(path.read_bytes()).hexdigest()
    with open_audio(path) as opened:
        os.lseek(opened.fd, 5, os.SEEK_SET)
        assert sha256_fd(opened.fd) == expected
        assert sha256_fd(opened.fd, block_size=1000) == expected  # blocks that do not divide the size
        assert os.lseek(opened.fd, 0, os.SEEK_CUR) == 5  # positional reads: the offset is untouched
        # The caller decodes from the same descriptor after hashing it.
        np.testing.assert_array_equal(load_mono(opened, 24000), load_mono(path, 24000))


def test_identity_changes_when_the_file_is_replaced(tmp_path):
    path = write_audio(tmp_path / "tone.wav")
    before = os.stat(path)
    assert identity(before) == (before.st_dev, before.st_ino, before.st_size, before.st_mtime_ns,
                                before.st_ctime_ns)
    assert identity(os.stat(path)) == identity(before)
    copy = tmp_path / "copy.wav"
    copy.write_bytes(path.read_bytes())
    os.utime(copy, ns=(before.st_atime_ns, before.st_mtime_ns))  # same bytes, size and mtime, as cp -p
    os.replace(copy, path)
    assert identity(os.stat(path)) != identity(before)
