"""Cheap header-level checks that tell whether a file is usable audio before anything decodes it."""

from __future__ import annotations

import errno
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import soundfile as sf

from mess_ai.audio.opening import OpenedAudio, open_audio, open_soundfile
from mess_ai.errors import AudioError

_STAGE = "validate"


@dataclass(frozen=True)
class AudioLimits:
    """The header facts a file may have before it is decoded; beyond them it is refused as bad input.

    A header is a promise the decoder acts on: a 72 KB WAV claiming 1 Hz would resample to 10 hours at 24 kHz
    (gigabytes), so the limits are checked before anything is allocated. The defaults pass every real recording
    (8 kHz telephone audio to 192 kHz masters, any channel count, hours-long concerts) and refuse only headers no
    recording has.
    """

    min_sample_rate: int = 4000
    max_sample_rate: int = 384_000
    max_duration_seconds: float = 6 * 3600

    def __post_init__(self) -> None:
        if self.min_sample_rate <= 0:
            raise ValueError(f"min_sample_rate must be positive, got {self.min_sample_rate}")
        if self.max_sample_rate < self.min_sample_rate:
            raise ValueError(f"max_sample_rate must be at least min_sample_rate ({self.min_sample_rate}), "
                             f"got {self.max_sample_rate}")
        if not self.max_duration_seconds > 0:  # also refuses NaN
            raise ValueError(f"max_duration_seconds must be positive, got {self.max_duration_seconds}")


@dataclass(frozen=True)
class AudioInfo:
    """What the header of an audio file says. ``frames`` is exact for PCM formats and an estimate for MP3."""

    sample_rate: int
    channels: int
    frames: int
    duration_seconds: float
    format: str
    subtype: str


def probe_audio(source: str | Path | OpenedAudio, min_duration_seconds: float = 1.0,
                limits: AudioLimits = AudioLimits()) -> AudioInfo:
    """Read the header of ``source`` and check it describes between ``min_duration_seconds`` and the ``limits``
    of decodable audio. A path is opened with ``open_audio``; an ``OpenedAudio`` is read through its descriptor.

    Only the header is read, so a file can pass here and still fail to decode (truncated data, non-finite samples):
    those are found by ``load_mono``. Bad input raises ``AudioError`` with stage ``validate``; a failure of the
    system (missing file, no permission, I/O error) raises ``OSError``.
    """
    if isinstance(source, OpenedAudio):
        return _probe(source, min_duration_seconds, limits)
    with open_audio(source, _STAGE) as opened:
        return _probe(opened, min_duration_seconds, limits)


def _probe(opened: OpenedAudio, min_duration_seconds: float, limits: AudioLimits) -> AudioInfo:
    path = opened.path
    try:
        with open_soundfile(opened) as audio:
            sample_rate, channels, frames = audio.samplerate, audio.channels, audio.frames
            fmt, subtype = audio.format, audio.subtype
    except sf.SoundFileError as err:
        raise _libsndfile_failure(path, err, "not an audio file libsndfile can decode", _STAGE) from err
    if channels < 1:
        raise AudioError(path, f"no audio channels (the header says {channels})", _STAGE)
    if sample_rate <= 0:
        raise AudioError(path, f"invalid sample rate {sample_rate} Hz", _STAGE)
    _check_limits(path, sample_rate, frames, limits, _STAGE)
    if frames <= 0:
        raise AudioError(path, "no audio data (the header is there but declares 0 samples)", _STAGE)
    duration = frames / sample_rate
    if duration < min_duration_seconds:
        # Rounded down, so a file just under the minimum never reads as "1.00 s, the minimum is 1.00 s".
        shown = math.floor(duration * 100) / 100
        raise AudioError(path, f"too short: {shown:.2f} s, the minimum is {min_duration_seconds:.2f} s", _STAGE)
    return AudioInfo(sample_rate=sample_rate, channels=channels, frames=frames, duration_seconds=duration,
                     format=fmt, subtype=subtype)


def _check_limits(path: str | Path, sample_rate: int, frames: int, limits: AudioLimits, stage: str) -> None:
    """Raise ``AudioError`` when the header's sample rate or length is beyond ``limits``."""
    if not limits.min_sample_rate <= sample_rate <= limits.max_sample_rate:
        raise AudioError(path, f"sample rate {sample_rate} Hz is outside the accepted range "
                               f"{limits.min_sample_rate}-{limits.max_sample_rate} Hz "
                               "(limits: --min-sample-rate/--max-sample-rate)", stage)
    duration = frames / sample_rate
    if duration > limits.max_duration_seconds:
        raise AudioError(path, f"the header says {_duration_text(duration, limits, math.ceil)} of audio, more than "
                               f"the limit of {_duration_text(limits.max_duration_seconds, limits)} "
                               "(--max-duration-hours)", stage)


def _duration_text(seconds: float, limits: AudioLimits, rounding: Callable[[float], int] = math.floor) -> str:
    """``seconds`` to a tenth, in hours (seconds for a limit under 6 minutes). A length is rounded up and a limit
    down, so a length just over the limit never reads as equal to it."""
    value, unit = (seconds / 3600, "h") if limits.max_duration_seconds >= 360 else (seconds, "s")
    # round() first: 0.3 * 10 is 3.0000000000000004, which ceil would make 0.4.
    return f"{rounding(round(value * 10, 9)) / 10:.1f} {unit}"


def _libsndfile_failure(path: str | Path, err: sf.SoundFileError, what: str, stage: str) -> AudioError | OSError:
    """The exception for a libsndfile error: ``AudioError`` "<what> (<libsndfile's words>)" for bad bytes, or an
    ``OSError`` when libsndfile says "System error", its words for any failed read or seek of the OS. Those say
    nothing about the bytes (a network mount dropping, a failing disk), so they are retried, not recorded as bad."""
    message = _libsndfile_message(err)
    if message == "Format not recognised" and Path(path).suffix.lower() == ".mp3":
        # What libsndfile says of it by name, once mpg123 found no frame either (see ``open_soundfile``).
        message = "no MPEG audio frames found"
    if "System error" in message:
        return OSError(errno.EIO, f"the system failed to read the file (libsndfile: {message})", str(path))
    return AudioError(path, f"{what} ({message})", stage)


# libsndfile's MP3 reader answers this for any existing .mp3 it finds no MPEG frames in (text, zeros, ...);
# every caller has already opened the file, so the words would only mislead.
_MISLEADING_MP3_MESSAGE = "File does not exist or is not a regular file (possibly a pipe?)"


def _libsndfile_message(err: sf.SoundFileError) -> str:
    """libsndfile's own words, without soundfile's "Error opening '<path>':" prefix (the path is said already)."""
    message = (getattr(err, "error_string", None) or str(err)).strip().rstrip(".")
    return "no MPEG audio frames found" if message == _MISLEADING_MP3_MESSAGE else message
