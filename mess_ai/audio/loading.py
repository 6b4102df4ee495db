"""Decode an audio file to one mono float32 signal at the model's sample rate, in bounded memory."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from mess_ai.audio.opening import OpenedAudio, open_audio, open_soundfile
from mess_ai.audio.validation import AudioLimits, _check_limits, _duration_text, _libsndfile_failure
from mess_ai.errors import AudioError

_STAGE = "load"
# Room for the resampler's rounding and for MP3 headers that underestimate the length a little.
_LENGTH_MARGIN = 64
# The most one multichannel block may take as float32, whatever the channel count: 30 s of 64 channels at 192 kHz
# would otherwise be 1.5 GB.
_MAX_BLOCK_BYTES = 64 << 20
# libsndfile (1.2.2 here) decodes an MP3 read in several calls wrongly for a few thousand samples after the start of
# each call when the encoder leaned on its bit reservoir (tonal music: errors of 0.4 in [-1, 1] every 30 s), while
# a read that starts from a seek is right past its first 2,048 samples. Each block of an MP3 after the first is
# therefore read from this many frames earlier, and those frames are dropped: the samples are then those of the file
# read in one call (bit for bit at 44.1 and 48 kHz, within 1e-7 for MPEG-2 rates; tests/audio/test_loading.py).
_MPEG_REREAD_FRAMES = 8192
# What ``load_mono``'s samples are, beyond the file and the target rate, recorded with each track's features:
# 2 (2026-12-01): MP3 blocks read from a seek, as above. A track done without it was decoded before.
DECODER_REVISION = 2
BLOCK_SECONDS = 30.0


def decoded_with_mp3_glitches(relative_path: str, duration_seconds: float | None, revision: int | None) -> bool:
    """Whether a track's stored features come from an MP3 decoded before ``DECODER_REVISION`` 2 that was longer than
    one block, so that its samples around each block boundary were wrong (the plan extracts it again)."""
    return (relative_path.lower().endswith(".mp3") and (revision or 0) < 2
            and (duration_seconds or 0.0) > BLOCK_SECONDS)


def load_mono(source: str | Path | OpenedAudio, target_sample_rate: int, *, block_seconds: float = BLOCK_SECONDS,
              limits: AudioLimits = AudioLimits()) -> np.ndarray:
    """Decode ``source``, average its channels and resample to ``target_sample_rate``: float32 [n_samples].

    A path is opened with ``open_audio``; an ``OpenedAudio`` is decoded from its descriptor, so the bytes decoded
    are those of the file the caller opened (and hashed). The header is checked against ``limits`` first. The file
    is decoded ``block_seconds`` at a time (at most 64 MiB a block) and streamed through the resampler into one
    output array allocated up front from the header's length, capped at ``limits.max_duration_seconds``: the peak
    memory is bounded by the settings, never by what a header claims, and decoding stops with ``AudioError`` once
    the audio passes the limit. The output is trimmed to what was actually decoded (MP3 headers only estimate their
    length); a file that decodes to no samples at all raises ``AudioError``, as do decode errors and NaN/inf
    samples. Failures of the system (missing file, I/O error, also mid-decode) raise ``OSError``: they are retried.
    Equal rates skip resampling, so the samples come back unchanged apart from the channel average.
    """
    if target_sample_rate <= 0:
        raise ValueError(f"target_sample_rate must be positive, got {target_sample_rate}")
    if block_seconds <= 0:
        raise ValueError(f"block_seconds must be positive, got {block_seconds}")
    if isinstance(source, OpenedAudio):
        return _load(source, target_sample_rate, block_seconds, limits)
    with open_audio(source, _STAGE) as opened:
        return _load(opened, target_sample_rate, block_seconds, limits)


def _load(opened: OpenedAudio, target_sample_rate: int, block_seconds: float, limits: AudioLimits) -> np.ndarray:
    path = opened.path
    try:
        with open_soundfile(opened) as audio:
            _check_limits(path, audio.samplerate, max(audio.frames, 0), limits, _STAGE)
            signal = _decode(path, audio, target_sample_rate, block_seconds, limits)
    except sf.SoundFileError as err:
        raise _libsndfile_failure(path, err, "cannot decode the audio", _STAGE) from err
    if signal.size == 0:
        raise AudioError(path, "decodes to no audio samples", _STAGE)
    return signal


def _decode(path: Path, audio: sf.SoundFile, target_sample_rate: int, block_seconds: float,
            limits: AudioLimits) -> np.ndarray:
    """The block loop of ``load_mono``: float32 [n_samples] at ``target_sample_rate``."""
    in_rate = audio.samplerate
    resampler = None
    if in_rate != target_sample_rate:
        resampler = soxr.ResampleStream(in_rate, target_sample_rate, 1, dtype="float32", quality="HQ")
    block_frames = max(1, min(int(block_seconds * in_rate), _MAX_BLOCK_BYTES // (audio.channels * 4)))
    # 16-bit PCM (most WAV, AIFF and FLAC files) is read as int16 and converted here: libsndfile's own conversion
    # to float32 took three times as long as the read itself (see docs/benchmarks.md, overhead).
    pcm16 = audio.subtype == "PCM_16"
    # Downmix as a matrix-vector product: numpy's mean over the short channel axis is a strided reduction,
    # about 18x slower, and was the costliest step of decoding (see docs/benchmarks.md, overhead).
    weights = np.full(audio.channels, 1.0 / audio.channels, dtype=np.float32)
    reread = _MPEG_REREAD_FRAMES if audio.format == "MP3" else 0
    max_frames = int(limits.max_duration_seconds * in_rate)
    # Integer ceiling of frames * out / in, exact however long the file.
    expected = -(-min(max(audio.frames, 0), max_frames) * target_sample_rate // in_rate) + _LENGTH_MARGIN
    out = np.empty(expected, dtype=np.float32)
    written = 0
    frames_read = 0
    while True:
        try:
            back = min(reread, frames_read)
            if back:
                audio.seek(frames_read - back)
            block = audio.read(block_frames + back, dtype="int16" if pcm16 else "float32", always_2d=True)[back:]
        except sf.SoundFileError as err:
            raise _libsndfile_failure(path, err, f"cannot decode the audio near {frames_read / in_rate:.1f} s",
                                      _STAGE) from err
        last = len(block) == 0
        mono = downmix_pcm16(block) if pcm16 else block @ weights
        # Frees the multichannel block before the resampler allocates its output: one less block at the peak.
        del block
        if not last:
            if not pcm16:  # integers are always finite
                _check_finite(path, mono, frames_read, in_rate)
            frames_read += len(mono)
            # soundfile reads no further than the header's length today; this keeps the output bounded by the
            # limit even for a decoder that goes on past a header's estimate.
            if frames_read > max_frames:
                raise AudioError(path, f"decodes to more than the limit of "
                                       f"{_duration_text(limits.max_duration_seconds, limits)} "
                                       "(--max-duration-hours)", _STAGE)
        if resampler is not None:
            mono = resampler.resample_chunk(mono, last=last)
        out = _append(out, written, mono)
        written += len(mono)
        if last:
            break
    # In-place shrink: a trimmed copy would briefly hold the output twice.
    out.resize(written, refcheck=False)
    return out


def downmix_pcm16(block: np.ndarray) -> np.ndarray:
    """16-bit PCM to float: int16 [frames, channels] -> float32 [frames], the mean of the channels.

    Scaled by 1/32768, as libsndfile scales 16-bit PCM to float. The channels are summed in float32, which holds a
    sum of up to 512 16-bit samples exactly, and scaled once; for one, two or four channels every step is exact,
    so the result equals libsndfile's float32 samples downmixed by ``load_mono``'s matrix-vector product. A loop
    over the channel columns: the matrix-vector product itself would first convert the whole block, and is slower.
    """
    mono = block[:, 0].astype(np.float32)
    for channel in range(1, block.shape[1]):
        mono += block[:, channel]
    mono *= np.float32(1.0 / (32768 * block.shape[1]))
    return mono


def _check_finite(path: Path, mono: np.ndarray, first_frame: int, sample_rate: int) -> None:
    """Raise ``AudioError`` naming the time of the first NaN/inf sample (they would smear through the resampler)."""
    if np.isfinite(mono).all():
        return
    at = (first_frame + int(np.argmin(np.isfinite(mono)))) / sample_rate
    raise AudioError(path, f"contains non-finite samples (NaN or inf) near {at:.1f} s", _STAGE)


def _append(out: np.ndarray, written: int, chunk: np.ndarray) -> np.ndarray:
    """Copy ``chunk`` into ``out`` after ``written`` samples, growing ``out`` in place when the header was short."""
    needed = written + len(chunk)
    if needed > len(out):
        out.resize(max(needed, len(out) + len(out) // 4), refcheck=False)
    out[written:needed] = chunk
    return out
