"""probe_audio accepts real audio in every supported container and refuses bad files with a reason a person reads."""

from __future__ import annotations

import errno
import os

import pytest
import soundfile as sf

import mess_ai.audio.validation as validation
from mess_ai.audio import AudioInfo, AudioLimits, open_audio, probe_audio
from mess_ai.errors import AudioError
from tests.helpers.audio import write_audio, write_empty, write_header_only, write_nonfinite_wav, write_not_audio

GOOD_FILES = [
    # (name, sample_rate, channels, subtype, libsndfile format)
    ("pcm16_mono_8k.wav", 8000, 1, "PCM_16", "WAV"),
    ("pcm24_stereo_44k.wav", 44100, 2, "PCM_24", "WAV"),
    ("float_stereo_96k.wav", 96000, 2, "FLOAT", "WAV"),
    ("pcm16_mono_22k.flac", 22050, 1, "PCM_16", "FLAC"),
    ("pcm24_stereo_96k.flac", 96000, 2, "PCM_24", "FLAC"),
    ("vorbis_stereo_44k.ogg", 44100, 2, "VORBIS", "OGG"),
    ("vorbis_mono_16k.ogg", 16000, 1, "VORBIS", "OGG"),
    ("mpeg_stereo_44k.mp3", 44100, 2, "MPEG_LAYER_III", "MP3"),
    ("mpeg_mono_8k.mp3", 8000, 1, "MPEG_LAYER_III", "MP3"),
    ("pcm16_mono_48k.aiff", 48000, 1, "PCM_16", "AIFF"),
    ("pcm24_stereo_32k.aif", 32000, 2, "PCM_24", "AIFF"),
    ("float_stereo_24k.aiff", 24000, 2, "FLOAT", "AIFF"),
]


@pytest.mark.parametrize(("name", "sample_rate", "channels", "subtype", "fmt"), GOOD_FILES)
def test_good_files_pass_with_their_header_facts(tmp_path, name, sample_rate, channels, subtype, fmt):
    path = write_audio(tmp_path / name, seconds=1.5, sample_rate=sample_rate, channels=channels, subtype=subtype)
    info = probe_audio(path)
    assert isinstance(info, AudioInfo)
    assert (info.sample_rate, info.channels, info.format, info.subtype) == (sample_rate, channels, fmt, subtype)
    assert info.frames == pytest.approx(1.5 * sample_rate, rel=0.02)
    assert info.duration_seconds == pytest.approx(1.5, rel=0.02)
    # Read through the descriptor of a file opened once, the header says the same.
    with open_audio(path) as opened:
        assert probe_audio(opened) == info


def _reason(path, **kwargs) -> str:
    with pytest.raises(AudioError) as caught:
        probe_audio(path, **kwargs)
    assert caught.value.stage == "validate"
    assert caught.value.path == str(path)
    return caught.value.reason


def test_empty_file(tmp_path):
    assert _reason(write_empty(tmp_path / "empty.wav")) == "empty file (0 bytes)"


def test_text_named_wav_is_not_audio(tmp_path):
    reason = _reason(write_not_audio(tmp_path / "notes.wav"))
    assert reason.startswith("not an audio file libsndfile can decode (")
    assert "Format not recognised" in reason


def test_text_named_mp3_is_not_audio(tmp_path):
    # libsndfile itself would say "File does not exist or is not a regular file" about this existing file.
    reason = _reason(write_not_audio(tmp_path / "notes.mp3"))
    assert reason == "not an audio file libsndfile can decode (no MPEG audio frames found)"


def test_header_without_data(tmp_path):
    reason = _reason(write_header_only(tmp_path / "cut.wav", declared_seconds=10.0))
    assert reason == "no audio data (the header is there but declares 0 samples)"


def test_header_with_a_few_bytes_of_data_is_too_short(tmp_path):
    reason = _reason(write_header_only(tmp_path / "cut.wav", sample_rate=8000, declared_seconds=10.0,
                                       data_bytes=1000))
    assert reason == "too short: 0.06 s, the minimum is 1.00 s"


def test_too_short(tmp_path):
    assert _reason(write_audio(tmp_path / "blip.flac", seconds=0.3)) == "too short: 0.30 s, the minimum is 1.00 s"


def test_just_under_the_minimum_never_reads_as_equal(tmp_path):
    path = write_audio(tmp_path / "almost.wav", seconds=0.9999, sample_rate=24000)
    assert _reason(path) == "too short: 0.99 s, the minimum is 1.00 s"


def test_minimum_is_configurable(tmp_path):
    path = write_audio(tmp_path / "blip.wav", seconds=0.3)
    assert probe_audio(path, min_duration_seconds=0.25).duration_seconds == pytest.approx(0.3)
    assert _reason(path, min_duration_seconds=2.0) == "too short: 0.30 s, the minimum is 2.00 s"


def test_missing_file_is_an_os_error_and_a_directory_bad_input(tmp_path):
    # A missing file says nothing about its bytes: the run records it as worth retrying, not as bad audio.
    with pytest.raises(FileNotFoundError):
        probe_audio(tmp_path / "gone.wav")
    (tmp_path / "dir.wav").mkdir()
    assert _reason(tmp_path / "dir.wav") == "not a regular file (a directory)"


def test_nonfinite_samples_pass_the_header_check(tmp_path):
    # The header of a float WAV full of NaN is perfectly valid; load_mono is what refuses it.
    assert probe_audio(write_nonfinite_wav(tmp_path / "nan.wav")).subtype == "FLOAT"


def test_an_mp3_with_junk_before_its_first_frame_passes_as_by_name(tmp_path):
    # By name libsndfile lets mpg123 skip up to 64 KiB of junk; read through a descriptor it must too.
    clean = write_audio(tmp_path / "clean.mp3", seconds=1.5, sample_rate=44100)
    padded = tmp_path / "padded.mp3"
    padded.write_bytes(bytes(1000) + clean.read_bytes())
    assert probe_audio(padded).frames == probe_audio(clean).frames == sf.info(str(padded)).frames
    too_much = tmp_path / "too_much.mp3"
    too_much.write_bytes(bytes(1 << 16) + clean.read_bytes())
    assert _reason(too_much) == "not an audio file libsndfile can decode (no MPEG audio frames found)"


def test_default_limits_pass_real_recordings(tmp_path):
    for path, rate, channels in [(tmp_path / "phone.wav", 8000, 1), (tmp_path / "master.flac", 192000, 6)]:
        write_audio(path, seconds=1.5, sample_rate=rate, channels=channels)
        info = probe_audio(path)
        assert (info.sample_rate, info.channels) == (rate, channels)


@pytest.mark.parametrize(("sample_rate", "channels"), [(1, 1), (1000, 2), (500_000, 1)])
def test_a_sample_rate_out_of_range_is_refused_before_decoding(tmp_path, sample_rate, channels):
    # 1 Hz: 72 KB that would resample to 10 hours at 24 kHz (gigabytes) if anything believed the header.
    path = write_header_only(tmp_path / "bomb.wav", sample_rate=sample_rate, channels=channels,
                             declared_seconds=36000 / sample_rate, data_bytes=72000)
    assert _reason(path) == (f"sample rate {sample_rate} Hz is outside the accepted range 4000-384000 Hz "
                             "(limits: --min-sample-rate/--max-sample-rate)")


def test_a_header_longer_than_the_limit_is_refused(tmp_path):
    bomb = write_header_only(tmp_path / "bomb.wav", sample_rate=1, declared_seconds=36000, data_bytes=72000)
    assert _reason(bomb, limits=AudioLimits(min_sample_rate=1)) == (
        "the header says 10.0 h of audio, more than the limit of 6.0 h (--max-duration-hours)")
    path = write_audio(tmp_path / "three.wav", seconds=3.0, sample_rate=8000)
    assert _reason(path, limits=AudioLimits(max_duration_seconds=2.0)) == (
        "the header says 3.0 s of audio, more than the limit of 2.0 s (--max-duration-hours)")
    # Just over the limit never reads as equal to it.
    assert _reason(path, limits=AudioLimits(max_duration_seconds=2.99)) == (
        "the header says 3.0 s of audio, more than the limit of 2.9 s (--max-duration-hours)")
    assert probe_audio(path, limits=AudioLimits(max_duration_seconds=3.0)).duration_seconds == 3.0


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"min_sample_rate": 0}, "min_sample_rate must be positive, got 0"),
    ({"min_sample_rate": 48000, "max_sample_rate": 44100},
     r"max_sample_rate must be at least min_sample_rate \(48000\), got 44100"),
    ({"max_duration_seconds": 0.0}, "max_duration_seconds must be positive, got 0.0"),
    ({"max_duration_seconds": float("nan")}, "max_duration_seconds must be positive, got nan"),
])
def test_bad_limits(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AudioLimits(**kwargs)


def test_a_system_error_of_libsndfile_is_an_os_error(tmp_path, monkeypatch):
    # libsndfile words every failed read or seek of the OS "System error". Here it gets a closed descriptor.
    path = write_audio(tmp_path / "tone.wav")

    def closed_descriptor(opened):
        fd = os.dup(opened.fd)
        os.close(fd)
        return sf.SoundFile(fd, closefd=False)

    monkeypatch.setattr(validation, "open_soundfile", closed_descriptor)
    with pytest.raises(OSError) as caught:
        probe_audio(path)
    assert caught.value.errno == errno.EIO
    assert caught.value.filename == str(path)
    assert "System error" in str(caught.value)
