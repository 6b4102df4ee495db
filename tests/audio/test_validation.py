"""probe_audio accepts real audio in every supported container and refuses bad files with a reason a person reads."""

from __future__ import annotations

import pytest

from mess_ai.audio import AudioInfo, probe_audio
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


def test_missing_file_and_directory(tmp_path):
    assert _reason(tmp_path / "gone.wav") == "cannot read the file (No such file or directory)"
    (tmp_path / "dir.wav").mkdir()
    assert _reason(tmp_path / "dir.wav") == "not a regular file"


def test_nonfinite_samples_pass_the_header_check(tmp_path):
    # The header of a float WAV full of NaN is perfectly valid; load_mono is what refuses it.
    assert probe_audio(write_nonfinite_wav(tmp_path / "nan.wav")).subtype == "FLOAT"
