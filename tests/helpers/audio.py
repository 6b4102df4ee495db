"""Real audio files for tests, written with soundfile: every test makes its input through these helpers."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import soundfile as sf

_FORMATS = {
    ".wav": "WAV",
    ".flac": "FLAC",
    ".ogg": "OGG",
    ".mp3": "MP3",
    ".aif": "AIFF",
    ".aiff": "AIFF",
}
_DEFAULT_SUBTYPE = {"WAV": "PCM_16", "FLAC": "PCM_16", "OGG": "VORBIS", "MP3": "MPEG_LAYER_III", "AIFF": "PCM_16"}


def tone(seconds: float, sample_rate: int, frequency: float = 440.0, channels: int = 1, amplitude: float = 0.5,
         seed: int | None = None) -> np.ndarray:
    """A sine at ``frequency`` (plus a little noise when ``seed`` is given): float32 [n_samples, channels]."""
    n = int(round(seconds * sample_rate))
    t = np.arange(n, dtype=np.float64) / sample_rate
    channels_data = []
    for c in range(channels):
        x = amplitude * np.sin(2 * np.pi * frequency * (1 + 0.01 * c) * t)
        if seed is not None:
            x += 0.05 * np.random.default_rng(seed + c).standard_normal(n)
        channels_data.append(x)
    return np.stack(channels_data, axis=1).astype(np.float32)


def write_audio(path: str | Path, seconds: float = 2.0, sample_rate: int = 24000, channels: int = 1,
                frequency: float = 440.0, subtype: str | None = None, seed: int | None = None,
                data: np.ndarray | None = None) -> Path:
    """Write a real audio file; the format follows the suffix. Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = _FORMATS[path.suffix.lower()]
    if data is None:
        data = tone(seconds, sample_rate, frequency, channels, seed=seed)
    sf.write(str(path), data, sample_rate, format=fmt, subtype=subtype or _DEFAULT_SUBTYPE[fmt])
    return path


def write_tone_in_blocks(path: str | Path, seconds: float, sample_rate: int, channels: int = 1,
                         frequency: float = 440.0, subtype: str | None = None, block_seconds: float = 10.0) -> Path:
    """Write a long sine file a block at a time, so making a long test file does not itself need gigabytes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = _FORMATS[path.suffix.lower()]
    total = int(round(seconds * sample_rate))
    block = int(round(block_seconds * sample_rate))
    with sf.SoundFile(str(path), "w", sample_rate, channels, subtype or _DEFAULT_SUBTYPE[fmt], format=fmt) as out:
        for start in range(0, total, block):
            t = np.arange(start, min(start + block, total), dtype=np.float64) / sample_rate
            x = 0.5 * np.sin(2 * np.pi * frequency * t)
            out.write(np.repeat(x[:, None], channels, axis=1).astype(np.float32))
    return path


def write_empty(path: str | Path) -> Path:
    """A 0-byte file (an interrupted copy)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def write_not_audio(path: str | Path) -> Path:
    """Plain text under an audio name (a mis-named file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"This is a text file, not audio.\n" * 20)
    return path


def write_header_only(path: str | Path, sample_rate: int = 44100, channels: int = 1, declared_seconds: float = 1.0,
                      data_bytes: int = 0) -> Path:
    """A valid 16-bit PCM WAV header that declares ``declared_seconds`` of audio followed by only ``data_bytes`` of
    it (a download cut off right after the header)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    block_align = 2 * channels
    declared = int(round(declared_seconds * sample_rate)) * block_align
    header = (b"RIFF" + struct.pack("<I", 36 + declared) + b"WAVE"
              + b"fmt " + struct.pack("<IHHIIHH", 16, 1, channels, sample_rate, sample_rate * block_align,
                                      block_align, 16)
              + b"data" + struct.pack("<I", declared))
    path.write_bytes(header + bytes(data_bytes))
    return path


def write_nonfinite_wav(path: str | Path, seconds: float = 3.0, sample_rate: int = 24000, channels: int = 1,
                        bad_at_seconds: float = 2.0) -> Path:
    """A 32-bit float WAV of a sine with a NaN at ``bad_at_seconds`` and an inf just after it; the header is fine."""
    data = tone(seconds, sample_rate, channels=channels)
    bad = int(round(bad_at_seconds * sample_rate))
    data[bad, 0] = np.nan
    data[bad + 10, channels - 1] = np.inf
    return write_audio(path, sample_rate=sample_rate, channels=channels, subtype="FLOAT", data=data)
