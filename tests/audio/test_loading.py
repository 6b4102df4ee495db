"""load_mono decodes, downmixes and resamples any supported file in blocks, in bounded memory."""

from __future__ import annotations

import errno
import os
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import soxr

import mess_ai.audio.loading as loading
from mess_ai.audio import AudioLimits, load_mono, open_audio
from mess_ai.errors import AudioError
from tests.helpers.audio import (tone, write_audio, write_empty, write_header_only, write_nonfinite_wav,
                                 write_not_audio, write_tone_in_blocks)

TARGET = 24000


@pytest.mark.parametrize(("name", "sample_rate", "channels", "subtype"), [
    ("a.wav", 8000, 1, "PCM_16"),
    ("b.wav", 44100, 2, "PCM_24"),
    ("c.wav", 96000, 2, "FLOAT"),
    ("d.flac", 48000, 2, "PCM_24"),
    ("e.aiff", 22050, 1, "PCM_16"),
    ("f.ogg", 44100, 2, None),
    ("g.mp3", 44100, 2, None),
    ("h.mp3", 16000, 1, None),
])
def test_output_is_float32_mono_at_the_target_rate(tmp_path, name, sample_rate, channels, subtype):
    path = write_audio(tmp_path / name, seconds=2.0, sample_rate=sample_rate, channels=channels, subtype=subtype)
    signal = load_mono(path, TARGET)
    assert signal.dtype == np.float32
    assert signal.ndim == 1
    # Lossy codecs may add or drop an encoder frame; lossless ones must be exact to the resampler's rounding.
    tolerance = 0.05 * TARGET if name.endswith((".mp3", ".ogg")) else 1
    assert abs(len(signal) - 2 * TARGET) <= tolerance
    assert np.isfinite(signal).all()
    # A 0.5-amplitude sine has RMS 0.35; two channels a few Hz apart average to roughly 0.25.
    assert 0.2 < float(np.sqrt(np.mean(signal ** 2))) < 0.4


def test_matches_an_independent_whole_file_downmix_and_resample(tmp_path):
    path = write_audio(tmp_path / "noisy.wav", seconds=3.0, sample_rate=44100, channels=2, subtype="FLOAT", seed=7)
    data, _ = sf.read(path, dtype="float64")
    expected = soxr.resample(data.mean(axis=1), 44100, TARGET, quality="HQ")
    # An odd block size puts block edges at arbitrary samples: streaming must not show them.
    for block_seconds in (30.0, 0.37):
        signal = load_mono(path, TARGET, block_seconds=block_seconds)
        assert len(signal) == len(expected)
        assert np.abs(signal - expected).max() < 1e-5


def test_equal_rate_returns_the_samples_unchanged(tmp_path):
    data = tone(2.0, TARGET, seed=3)
    path = write_audio(tmp_path / "same.wav", sample_rate=TARGET, subtype="FLOAT", data=data)
    np.testing.assert_array_equal(load_mono(path, TARGET, block_seconds=0.3), data[:, 0])


def test_equal_rate_stereo_is_the_mean_of_the_channels(tmp_path):
    data = tone(2.0, TARGET, channels=2, seed=5)
    path = write_audio(tmp_path / "stereo.wav", sample_rate=TARGET, subtype="FLOAT", data=data)
    np.testing.assert_allclose(load_mono(path, TARGET), data.mean(axis=1), atol=1e-7)


@pytest.mark.parametrize("channels", [1, 2, 3, 4])
def test_16_bit_pcm_read_as_integers_equals_libsndfiles_float_conversion(tmp_path, channels):
    pcm16 = write_audio(tmp_path / "pcm16.wav", seconds=2.0, sample_rate=44100, channels=channels, subtype="PCM_16",
                        seed=2)
    # The same samples as libsndfile converts them to float32, in a file it reads as float32 (the float path).
    samples, _ = sf.read(pcm16, dtype="float32", always_2d=True)
    floats = write_audio(tmp_path / "float.wav", sample_rate=44100, subtype="FLOAT", data=samples)
    for rate in (44100, TARGET):
        from_integers = load_mono(pcm16, rate, block_seconds=0.37)
        from_floats = load_mono(floats, rate, block_seconds=0.37)
        if channels == 3:  # 1/3 is not a power of two: one rounding apart
            np.testing.assert_allclose(from_integers, from_floats, rtol=0, atol=1e-6)
        else:
            np.testing.assert_array_equal(from_integers, from_floats)


def test_three_minute_stereo_file_never_sits_in_memory_whole(tmp_path):
    path = write_tone_in_blocks(tmp_path / "long.wav", seconds=180.0, sample_rate=44100, channels=2)
    whole_stereo_float32 = 180 * 44100 * 2 * 4
    tracemalloc.start()
    try:
        signal = load_mono(path, TARGET, block_seconds=10.0)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(signal) == 180 * TARGET
    # The output itself is 17 MB here; reading the file whole, or concatenating a list of resampled chunks,
    # would each pass half of the 64 MB the file takes as float32 stereo.
    assert peak < whole_stereo_float32 / 2, f"peak {peak / 1e6:.1f} MB"


def _reason(path) -> str:
    with pytest.raises(AudioError) as caught:
        load_mono(path, TARGET)
    assert caught.value.stage == "load"
    return caught.value.reason


def test_nonfinite_samples_are_refused_naming_the_time(tmp_path):
    path = write_nonfinite_wav(tmp_path / "nan.wav", seconds=3.0, bad_at_seconds=2.3)
    assert _reason(path) == "contains non-finite samples (NaN or inf) near 2.3 s"


def test_inf_alone_is_refused_too(tmp_path):
    data = tone(2.0, 16000)
    data[20000, 0] = -np.inf
    path = write_audio(tmp_path / "inf.wav", sample_rate=16000, subtype="FLOAT", data=data)
    assert _reason(path) == "contains non-finite samples (NaN or inf) near 1.2 s"


def test_truncated_flac_is_a_decode_error(tmp_path):
    path = write_audio(tmp_path / "whole.flac", seconds=3.0, sample_rate=44100, channels=2, seed=1)
    cut = tmp_path / "cut.flac"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    reason = _reason(cut)
    assert reason.startswith("cannot decode the audio near ")
    assert "lost sync" in reason


def test_truncated_mp3_returns_what_was_decodable(tmp_path):
    # The MP3 header still claims 4 s; the preallocated output must be trimmed to what really decoded.
    path = write_audio(tmp_path / "whole.mp3", seconds=4.0, sample_rate=44100)
    cut = tmp_path / "cut.mp3"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert sf.info(cut).frames == 4 * 44100
    signal = load_mono(cut, TARGET)
    assert 1.0 * TARGET < len(signal) < 3.0 * TARGET
    assert np.isfinite(signal).all()


def test_bad_files_are_load_errors_too(tmp_path):
    assert _reason(write_empty(tmp_path / "empty.wav")) == "empty file (0 bytes)"
    assert _reason(write_not_audio(tmp_path / "text.ogg")) == "cannot decode the audio (Format not recognised)"
    assert _reason(write_header_only(tmp_path / "cut.wav")) == "decodes to no audio samples"
    # a file that cannot be opened is an OS error, not bad audio: the run records it as worth retrying
    with pytest.raises(FileNotFoundError):
        load_mono(tmp_path / "gone.wav", TARGET)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"target_sample_rate": 0}, "target_sample_rate must be positive, got 0"),
    ({"target_sample_rate": TARGET, "block_seconds": 0.0}, "block_seconds must be positive, got 0.0"),
])
def test_bad_arguments(tmp_path, kwargs, message):
    path = write_audio(tmp_path / "ok.wav")
    with pytest.raises(ValueError, match=message):
        load_mono(path, **kwargs)


def _failure_and_peak(call) -> tuple[Exception, int]:
    """What ``call()`` raised, and the peak of the memory allocated while it ran (numpy arrays included)."""
    tracemalloc.start()
    try:
        call()
    except Exception as exc:  # noqa: BLE001 - handed to the test
        return exc, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    pytest.fail("did not raise")


def _claim_flac_frames(path: Path, frames: int) -> Path:
    """Rewrite the total sample count of a FLAC's STREAMINFO (its last 36 of bytes 18-26), so the header lies."""
    data = bytearray(path.read_bytes())
    assert data[:4] == b"fLaC" and data[4] & 0x7F == 0  # STREAMINFO, the block every FLAC starts with
    field = int.from_bytes(data[18:26], "big")
    data[18:26] = ((field & ~((1 << 36) - 1)) | frames).to_bytes(8, "big")
    path.write_bytes(bytes(data))
    return path


def _by_name_whole(path: Path) -> np.ndarray:
    """libsndfile opening the file by name and reading it in one call: float32 [n_samples, channels]."""
    with sf.SoundFile(str(path)) as audio:
        return audio.read(dtype="float32", always_2d=True)


@pytest.mark.parametrize(("name", "subtype"), [
    ("a.wav", "PCM_16"), ("b.wav", "PCM_24"), ("c.wav", "FLOAT"), ("d.flac", "PCM_16"), ("e.aiff", "PCM_16"),
    ("f.ogg", None), ("g.mp3", None),
])
def test_decoding_from_the_descriptor_gives_libsndfiles_samples_by_name(tmp_path, name, subtype):
    path = write_audio(tmp_path / name, seconds=2.0, sample_rate=TARGET, subtype=subtype, seed=6)
    with open_audio(path) as opened:
        signal = load_mono(opened, TARGET, block_seconds=0.37)
    # An MP3's samples after a seek (each block after the first) may differ from one read's in the last bit.
    np.testing.assert_allclose(signal, _by_name_whole(path)[:, 0], rtol=0, atol=1e-6 if name.endswith(".mp3") else 0)


@pytest.mark.parametrize("sample_rate", [44100, 24000])
def test_an_mp3_read_in_blocks_has_the_samples_of_one_whole_read(tmp_path, sample_rate):
    # Tonal music makes the encoder lean on its bit reservoir; libsndfile read in several calls then got about
    # 2,500 samples wrong (errors of 0.4) after the start of each 30 s block.
    t = np.arange(70 * sample_rate) / sample_rate
    music = (0.3 * np.sin(2 * np.pi * 440 * t) + 0.1 * np.sin(2 * np.pi * 1234 * t)).astype(np.float32)
    path = tmp_path / "organ.mp3"
    sf.write(path, np.stack([music, music], axis=1), sample_rate, format="MP3")
    whole = _by_name_whole(path)
    decoded = load_mono(path, sample_rate)
    assert len(decoded) == len(whole)
    np.testing.assert_allclose(decoded, whole.mean(axis=1), rtol=0, atol=1e-6)
    np.testing.assert_allclose(load_mono(path, TARGET), load_mono(path, TARGET, block_seconds=1000.0), rtol=0,
                               atol=1e-6)


def test_an_mp3_with_junk_before_its_first_frame_decodes_as_by_name(tmp_path):
    # By name libsndfile lets mpg123 skip up to 64 KiB of junk; read through a descriptor it must too.
    clean = write_audio(tmp_path / "clean.mp3", seconds=2.0, sample_rate=TARGET, seed=2)
    padded = tmp_path / "padded.mp3"
    padded.write_bytes(b"junk" * 250 + clean.read_bytes())
    np.testing.assert_allclose(load_mono(padded, TARGET), _by_name_whole(padded)[:, 0], rtol=0, atol=1e-6)


def test_default_limits_pass_real_recordings(tmp_path):
    for path, rate, channels in [(tmp_path / "phone.wav", 8000, 1), (tmp_path / "master.flac", 192000, 6)]:
        write_audio(path, seconds=1.5, sample_rate=rate, channels=channels)
        assert len(load_mono(path, TARGET)) == int(1.5 * TARGET)


def test_a_decode_bomb_header_is_refused_before_anything_is_allocated(tmp_path):
    # 72 KB whose header says 1 Hz: 10 hours, 3.5 GB as float32 at 24 kHz, if the header were believed.
    path = write_header_only(tmp_path / "bomb.wav", sample_rate=1, declared_seconds=36000, data_bytes=72000)
    error, peak = _failure_and_peak(lambda: load_mono(path, TARGET))
    assert isinstance(error, AudioError) and error.stage == "load"
    assert error.reason == ("sample rate 1 Hz is outside the accepted range 4000-384000 Hz "
                            "(limits: --min-sample-rate/--max-sample-rate)")
    assert peak < 1 << 20


def test_a_header_longer_than_the_limit_is_refused_before_decoding(tmp_path):
    # 150 KB of FLAC whose header claims 10 hours: the output would be allocated from that length.
    path = _claim_flac_frames(write_audio(tmp_path / "long.flac", seconds=3.0, sample_rate=8000), 10 * 3600 * 8000)
    error, peak = _failure_and_peak(lambda: load_mono(path, TARGET))
    assert isinstance(error, AudioError)
    assert error.reason == "the header says 10.0 h of audio, more than the limit of 6.0 h (--max-duration-hours)"
    assert peak < 1 << 20
    short = write_audio(tmp_path / "three.wav", seconds=3.0, sample_rate=8000)
    assert _reason_with(short, AudioLimits(max_duration_seconds=2.0)) == (
        "the header says 3.0 s of audio, more than the limit of 2.0 s (--max-duration-hours)")


def _reason_with(path, limits: AudioLimits) -> str:
    with pytest.raises(AudioError) as caught:
        load_mono(path, TARGET, block_seconds=0.5, limits=limits)
    assert caught.value.stage == "load"
    return caught.value.reason


def test_decoding_stops_at_the_limit_whatever_the_header_said(tmp_path, monkeypatch):
    # soundfile reads no further than a header's length today, so the header check is switched off here to show
    # the guard of the decode loop on its own.
    monkeypatch.setattr(loading, "_check_limits", lambda *args: None)
    path = write_audio(tmp_path / "three.wav", seconds=3.0, sample_rate=8000)
    assert _reason_with(path, AudioLimits(max_duration_seconds=2.0)) == (
        "decodes to more than the limit of 2.0 s (--max-duration-hours)")
    assert len(load_mono(path, TARGET, block_seconds=0.5, limits=AudioLimits(max_duration_seconds=3.0))) == 3 * TARGET


def test_a_block_is_capped_in_bytes_whatever_the_channel_count(tmp_path):
    # 8 channels at 192 kHz claiming 60 s: one 30 s block would be 184 MB of float32; the cap is 64 MiB.
    path = write_audio(tmp_path / "wide.flac", seconds=0.5, sample_rate=192000, channels=8, subtype="PCM_24")
    _claim_flac_frames(path, 60 * 192000)
    error, peak = _failure_and_peak(lambda: load_mono(path, TARGET))
    # The data ends long before the header said.
    assert isinstance(error, AudioError) and error.reason.startswith("cannot decode the audio near ")
    assert peak < (64 << 20) + (16 << 20), f"peak {peak / 1e6:.1f} MB"


def test_a_read_failing_in_the_os_mid_decode_is_an_os_error(tmp_path, monkeypatch):
    path = write_audio(tmp_path / "tone.wav", seconds=3.0, sample_rate=TARGET)
    real_read = sf.SoundFile.read
    reads = []
    folder = os.open(tmp_path, os.O_RDONLY)

    with open_audio(path) as opened:
        def read_then_fail(self, *args, **kwargs):
            reads.append(1)
            if len(reads) == 2:  # the disk goes away under the second block: read(2) fails with EISDIR
                os.dup2(folder, opened.fd)
            return real_read(self, *args, **kwargs)

        monkeypatch.setattr(sf.SoundFile, "read", read_then_fail)
        with pytest.raises(OSError) as caught:
            load_mono(opened, TARGET, block_seconds=1.0)
    os.close(folder)
    assert caught.value.errno == errno.EIO and caught.value.filename == str(path)
    assert "System error" in str(caught.value)
