"""load_mono decodes, downmixes and resamples any supported file in blocks, in bounded memory."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import soundfile as sf
import soxr

from mess_ai.audio import load_mono
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
    assert _reason(write_empty(tmp_path / "empty.wav")) == "cannot decode the audio (Format not recognised)"
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
