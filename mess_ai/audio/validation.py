"""Cheap header-level checks that tell whether a file is usable audio before anything decodes it."""

from __future__ import annotations

import math
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import soundfile as sf

from mess_ai.errors import AudioError

_STAGE = "validate"


@dataclass(frozen=True)
class AudioInfo:
    """What the header of an audio file says. ``frames`` is exact for PCM formats and an estimate for MP3."""

    sample_rate: int
    channels: int
    frames: int
    duration_seconds: float
    format: str
    subtype: str


def probe_audio(path: str | Path, min_duration_seconds: float = 1.0) -> AudioInfo:
    """Read the header of ``path`` and check it describes at least ``min_duration_seconds`` of decodable audio.

    Only the header is read, so a file can pass here and still fail to decode (truncated data, non-finite samples):
    those are found by ``load_mono``. Raises ``AudioError`` with stage ``validate``.
    """
    try:
        file_stat = os.stat(path)
    except OSError as err:
        raise AudioError(path, f"cannot read the file ({err.strerror})", _STAGE) from err
    if not stat.S_ISREG(file_stat.st_mode):
        raise AudioError(path, "not a regular file", _STAGE)
    if file_stat.st_size == 0:
        raise AudioError(path, "empty file (0 bytes)", _STAGE)
    try:
        info = sf.info(os.fsencode(path))  # bytes: a name that is not UTF-8 opens too
    except sf.SoundFileError as err:
        raise AudioError(path, f"not an audio file libsndfile can decode ({_libsndfile_message(err)})",
                         _STAGE) from err
    if info.channels < 1:
        raise AudioError(path, f"no audio channels (the header says {info.channels})", _STAGE)
    if info.samplerate <= 0:
        raise AudioError(path, f"invalid sample rate {info.samplerate} Hz", _STAGE)
    if info.frames <= 0:
        raise AudioError(path, "no audio data (the header is there but declares 0 samples)", _STAGE)
    duration = info.frames / info.samplerate
    if duration < min_duration_seconds:
        # Rounded down, so a file just under the minimum never reads as "1.00 s, the minimum is 1.00 s".
        shown = math.floor(duration * 100) / 100
        raise AudioError(path, f"too short: {shown:.2f} s, the minimum is {min_duration_seconds:.2f} s", _STAGE)
    return AudioInfo(sample_rate=info.samplerate, channels=info.channels, frames=info.frames,
                     duration_seconds=duration, format=info.format, subtype=info.subtype)


# libsndfile's MP3 reader answers this for any existing .mp3 it finds no MPEG frames in (text, zeros, ...);
# every caller has already opened the file, so the words would only mislead.
_MISLEADING_MP3_MESSAGE = "File does not exist or is not a regular file (possibly a pipe?)"


def _libsndfile_message(err: sf.SoundFileError) -> str:
    """libsndfile's own words, without soundfile's "Error opening '<path>':" prefix (the path is said already)."""
    message = (getattr(err, "error_string", None) or str(err)).strip().rstrip(".")
    return "no MPEG audio frames found" if message == _MISLEADING_MP3_MESSAGE else message
