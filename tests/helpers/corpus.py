"""A folder of broken and odd inputs, and what the pipeline must do with each of them.

``build_corpus(base)`` writes ``base/audio`` (the folder a run is pointed at) and ``base/outside`` (what symlinks
point out to) and returns one ``Expected`` per path under ``audio``: ``done`` with the duration the decoded audio
must have, ``failed`` with the stage and the words of the recorded reason, or ``ignored`` (never discovered, so no
manifest row at all). Every file is made here, with soundfile or as raw bytes, so the corpus needs no network.
"""

from __future__ import annotations

import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from tests.helpers.audio import (
    tone,
    write_audio,
    write_empty,
    write_header_only,
    write_nonfinite_wav,
    write_not_audio,
    write_tone_in_blocks,
)

DONE, FAILED, IGNORED = "done", "failed", "ignored"
LONG_SECONDS = 600.0

# The bytes an AAC file in an MP4 container (.m4a) starts with: an ``ftyp`` box with brand M4A. No AAC encoder is
# at hand offline, and none is needed: libsndfile cannot decode AAC, and discovery decides by extension alone.
_M4A_HEAD = (struct.pack(">I", 32) + b"ftypM4A " + struct.pack(">I", 512) + b"M4A mp42isom\x00\x00\x00\x00"
             + struct.pack(">I", 8) + b"free" + struct.pack(">I", 1024) + b"mdat")


@dataclass(frozen=True)
class Expected:
    """What must become of one path: ``kind`` says which of the issue's odd inputs it stands for."""

    kind: str
    status: str
    seconds: float | None = None  # done: the decoded duration (None: only roughly known, e.g. MP3 padding)
    stage: str | None = None  # failed: the stage that records it
    reason: str | None = None  # failed: words the recorded reason contains
    same_audio_as: str | None = None  # done: a path whose decoded audio is the same samples


def _m4a(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_M4A_HEAD + np.random.default_rng(7).bytes(1024))
    return path


def _truncate(path: Path, keep_fraction: float) -> Path:
    size = path.stat().st_size
    with open(path, "r+b") as fh:
        fh.truncate(int(size * keep_fraction))
    return path


def _symlink(link: Path, target: str | Path) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(target, link)


def write_not_utf8_name(folder: str | Path, seconds: float = 2.0) -> Path:
    """A valid WAV whose file name is not UTF-8 (bytes 0xff 0xfe; Python shows them as surrogate escapes)."""
    folder = Path(folder)
    placeholder = write_audio(folder / "placeholder.wav", seconds=seconds, frequency=777)
    path = folder / os.fsdecode(b"not-utf8-\xff\xfe.wav")
    os.rename(placeholder, path)
    return path


def build_corpus(base: str | Path, long_seconds: float = LONG_SECONDS) -> dict[str, Expected]:
    """Write the corpus under ``base`` (see the module docstring); returns {relative path under audio: Expected}."""
    base = Path(base)
    audio, outside = base / "audio", base / "outside"
    expected: dict[str, Expected] = {}

    def done(rel: str, kind: str, duration: float | None, same_audio_as: str | None = None, **write) -> None:
        if write:
            write_audio(audio / rel, **write)
        expected[rel] = Expected(kind, DONE, seconds=duration, same_audio_as=same_audio_as)

    def failed(rel: str, kind: str, stage: str, reason: str) -> None:
        expected[rel] = Expected(kind, FAILED, stage=stage, reason=reason)

    def ignored(rel: str, kind: str) -> None:
        expected[rel] = Expected(kind, IGNORED)

    # --- broken files: recorded with a reason -----------------------------------------------------------------
    write_empty(audio / "broken/empty.wav")
    failed("broken/empty.wav", "empty", "validate", "empty file (0 bytes)")
    write_not_audio(audio / "broken/text.wav")
    failed("broken/text.wav", "not audio", "validate", "not an audio file libsndfile can decode")
    write_not_audio(audio / "broken/text.mp3")
    failed("broken/text.mp3", "not audio (MP3 name)", "validate", "no MPEG audio frames found")
    write_header_only(audio / "broken/header_only.wav", declared_seconds=3.0)
    failed("broken/header_only.wav", "header only", "validate", "declares 0 samples")
    write_audio(audio / "broken/truncated.flac", seconds=6.0, sample_rate=44100, seed=1)
    _truncate(audio / "broken/truncated.flac", 0.5)
    failed("broken/truncated.flac", "truncated data (FLAC)", "preprocess", "cannot decode the audio near")
    write_nonfinite_wav(audio / "broken/nan_inf.wav", seconds=3.0, bad_at_seconds=2.0)
    failed("broken/nan_inf.wav", "NaN/inf samples", "preprocess", "non-finite samples (NaN or inf) near 2.0 s")
    write_audio(audio / "broken/short_0.3s.wav", seconds=0.3)
    failed("broken/short_0.3s.wav", "0.3 s", "validate", "too short: 0.30 s, the minimum is 1.00 s")
    _m4a(audio / "broken/aac_renamed.wav")
    failed("broken/aac_renamed.wav", "AAC bytes under an audio name", "validate",
           "not an audio file libsndfile can decode")

    # --- odd but valid: extracted ---------------------------------------------------------------------------
    done("odd/silence.wav", "silence", 4.0, data=np.zeros((4 * 24000, 1), np.float32), sample_rate=24000)
    # A WAV cut off mid-data decodes to the audio that is there (libsndfile trusts the file size over the header).
    write_audio(audio / "odd/truncated.wav", seconds=8.0, sample_rate=24000, seed=2)
    data_bytes = (audio / "odd/truncated.wav").stat().st_size - 44
    with open(audio / "odd/truncated.wav", "r+b") as fh:
        fh.truncate(44 + data_bytes // 2)
    done("odd/truncated.wav", "truncated data (WAV)", 4.0)
    write_tone_in_blocks(audio / "odd/ten_minutes.flac", seconds=long_seconds, sample_rate=24000)
    done("odd/ten_minutes.flac", "10 minutes", long_seconds)
    done("odd/mono.wav", "1 channel", 3.3, seconds=3.3, sample_rate=44100, channels=1, seed=3)
    done("odd/six_channels.wav", "6 channels", 3.3, seconds=3.3, sample_rate=48000, channels=6, seed=4)
    done("odd/u8.wav", "8-bit", 3.3, seconds=3.3, sample_rate=22050, subtype="PCM_U8", seed=5)
    done("odd/s24.wav", "24-bit", 3.3, seconds=3.3, sample_rate=44100, subtype="PCM_24", seed=6)
    done("odd/float.wav", "32-bit float", 3.3, seconds=3.3, sample_rate=44100, subtype="FLOAT", seed=6)
    done("odd/8k.wav", "8 kHz", 3.3, seconds=3.3, sample_rate=8000, seed=7)
    done("odd/192k.wav", "192 kHz", 3.3, seconds=3.3, sample_rate=192000, channels=2, subtype="PCM_24", seed=8)
    done("formats/tone.mp3", "MP3", None, seconds=4.0, sample_rate=44100, channels=2, seed=9)
    done("formats/tone.ogg", "OGG Vorbis", 4.0, seconds=4.0, sample_rate=48000, seed=10)
    done("formats/opus.ogg", "OGG Opus", 4.0, seconds=4.0, sample_rate=48000, subtype="OPUS", seed=11)
    # The same 24-bit samples in three containers: the features must be the same.
    samples = tone(12.3, 44100, channels=2, seed=12)
    done("formats/tone.flac", "FLAC", 12.3, data=samples, sample_rate=44100, subtype="PCM_24")
    done("formats/tone.aiff", "AIFF", 12.3, "formats/tone.flac", data=samples, sample_rate=44100, subtype="PCM_24")
    done("formats/SHOUTING.WAV", "upper-case extension", 12.3, "formats/tone.flac")
    sf.write(str(audio / "formats/SHOUTING.WAV"), samples, 44100, format="WAV", subtype="PCM_24")
    # FLAC bytes under a .wav name: libsndfile goes by the content.
    done("formats/flac_named.wav", "FLAC under a .wav name", 12.3, "formats/tone.flac")
    shutil.copyfile(audio / "formats/tone.flac", audio / "formats/flac_named.wav")

    # --- names: hostile or unusual, all extracted under safe track ids -------------------------------------
    hostile = {
        "names/with spaces.wav": "spaces",
        "names/Ünïcødé 音楽 🎵.wav": "unicode",
        "names/Cafe\u0301 (NFD).wav": "unicode, decomposed (NFD)",
        "names/quote\"double\" and 'single'.wav": "quotes",
        "names/-leading-dash.wav": "leading dash",
        "names/--help.wav": "leading dashes (an option's name)",
        "names/$(touch pwned); rm -rf ~.wav": "shell metacharacters",
        "names/'); DROP TABLE tracks;--.wav": "SQL in the name",
        "names/new\nline.wav": "newline in the name",
        "names/" + "long" * 60 + ".wav": "a 244-byte name",
    }
    for i, (rel, kind) in enumerate(hostile.items()):
        done(rel, kind, 2.0, seconds=2.0, frequency=300 + 20 * i)

    # --- one recording under two names -----------------------------------------------------------------------
    done("dupes/original.wav", "one recording, first name", 5.5, seconds=5.5, seed=13)
    shutil.copyfile(audio / "dupes/original.wav", audio / "dupes/copy.wav")
    done("dupes/copy.wav", "one recording, a copy under another name", 5.5, "dupes/original.wav")
    os.link(audio / "dupes/original.wav", audio / "dupes/hardlink.wav")
    done("dupes/hardlink.wav", "one recording, a hard link", 5.5, "dupes/original.wav")
    _symlink(audio / "dupes/symlink.wav", "original.wav")
    done("dupes/symlink.wav", "one recording, a symlink inside the root", 5.5, "dupes/original.wav")

    # --- never discovered ----------------------------------------------------------------------------------
    _m4a(audio / "formats/song.m4a")
    ignored("formats/song.m4a", "AAC in .m4a (not an audio extension mess-ai reads)")
    (audio / "dirs/x.wav").mkdir(parents=True)
    ignored("dirs/x.wav", "a directory named x.wav")
    done("dirs/x.wav/inside.wav", "a file inside the directory named x.wav", 2.0, seconds=2.0, frequency=500)
    write_audio(audio / "macos/._tone.wav", seconds=2.0)
    ignored("macos/._tone.wav", "macOS ._ resource fork")
    (audio / "macos/.DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1" + bytes(100))
    ignored("macos/.DS_Store", "macOS folder metadata")
    write_audio(audio / ".hidden/secret.wav", seconds=2.0)
    ignored(".hidden/secret.wav", "a file in a hidden folder")
    (audio / "notes.txt").write_text("liner notes\n")
    ignored("notes.txt", "not an audio extension")
    _symlink(audio / "links/loop", ".")
    ignored("links/loop", "a symlink loop (a folder linking to itself)")
    _symlink(audio / "links/up", "..")
    ignored("links/up", "a symlink to the root's own parent folder")
    _symlink(audio / "links/ping.wav", "pong.wav")
    _symlink(audio / "links/pong.wav", "ping.wav")
    ignored("links/ping.wav", "a symlink loop between two files")
    ignored("links/pong.wav", "a symlink loop between two files")
    _symlink(audio / "links/dangling.wav", "missing.wav")
    ignored("links/dangling.wav", "a dangling symlink")
    write_audio(outside / "private.wav", seconds=2.0)
    write_audio(outside / "folder/private.wav", seconds=2.0)
    _symlink(audio / "links/out.wav", outside / "private.wav")
    ignored("links/out.wav", "a symlink to a file out of the root")
    _symlink(audio / "links/out_relative.wav", "../../outside/private.wav")
    ignored("links/out_relative.wav", "a relative symlink out of the root")
    _symlink(audio / "links/outdir", outside / "folder")
    ignored("links/outdir", "a symlink to a folder out of the root")
    return expected
