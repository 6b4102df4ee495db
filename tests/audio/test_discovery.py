"""discover_audio finds exactly the audio files under a root; make_track_id gives safe, unique, stable ids."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import unicodedata

import pytest

from mess_ai.audio import AUDIO_EXTENSIONS, audio_source_at, discover_audio, make_track_id
from tests.helpers.audio import write_audio

_SAFE_ID = re.compile(r"[A-Za-z0-9_-]+")
NFC_CAFE = "caf\u00e9"
NFD_CAFE = "cafe\u0301"


def skip_unless_twins_can_exist(folder) -> None:
    """Skip when the file system under ``folder`` keeps only one of two names that differ only in Unicode
    normalisation (macOS APFS and HFS+ do): twins cannot exist there."""
    probe = folder / "normalisation-probe"
    probe.mkdir()
    for name in (NFC_CAFE, NFD_CAFE):
        (probe / name).write_bytes(name.encode())
    kept = len(os.listdir(probe))
    shutil.rmtree(probe)
    if kept != 2:
        pytest.skip(f"the file system of {folder} merges names that differ only in Unicode normalisation")


def _relatives(root) -> list[str]:
    return [source.relative for source in discover_audio(root)]


def test_every_extension_in_any_case_is_found(tmp_path):
    names = [f"t{i}{ext}" for i, ext in enumerate(AUDIO_EXTENSIONS)]
    names += ["upper.WAV", "mixed.FlAc", "shout.MP3", "caps.AIFF"]
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "notes.txt").write_bytes(b"x")
    (tmp_path / "cover.jpg").write_bytes(b"x")
    (tmp_path / "song.wav.bak").write_bytes(b"x")
    assert _relatives(tmp_path) == sorted(names)


def test_hidden_entries_and_macos_resource_forks_are_skipped(tmp_path):
    write_audio(tmp_path / "keep.wav")
    (tmp_path / ".hidden.wav").write_bytes(b"x")
    (tmp_path / "._keep.wav").write_bytes(b"x")
    (tmp_path / ".cache" / "inside.wav").parent.mkdir()
    (tmp_path / ".cache" / "inside.wav").write_bytes(b"x")
    assert _relatives(tmp_path) == ["keep.wav"]


def test_directory_named_like_audio_is_walked_not_returned(tmp_path):
    (tmp_path / "album.wav").mkdir()
    (tmp_path / "album.wav" / "track.flac").write_bytes(b"x")
    assert _relatives(tmp_path) == ["album.wav/track.flac"]


def test_sources_carry_absolute_path_posix_relative_and_track_id(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "c.ogg").write_bytes(b"x")
    (source,) = discover_audio(str(tmp_path))
    assert source.path == tmp_path / "a" / "b" / "c.ogg"
    assert source.path.is_absolute()
    assert source.relative == "a/b/c.ogg"
    assert source.track_id == make_track_id("a/b/c.ogg")


def test_order_is_sorted_and_repeatable(tmp_path):
    for name in ["b/z.wav", "a/y.wav", "c.wav", "a/b/x.wav", "B.wav", "a.wav"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    first = discover_audio(tmp_path)
    assert [s.relative for s in first] == sorted(s.relative for s in first)
    assert discover_audio(tmp_path) == first


def test_symlink_loop_is_not_followed(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "song.wav").write_bytes(b"x")
    os.symlink(tmp_path, tmp_path / "a" / "loop")
    os.symlink(tmp_path / "a", tmp_path / "a" / "self.wav")
    assert _relatives(tmp_path) == ["a/song.wav"]


def test_symlinks_leaving_the_root_or_broken_are_skipped(tmp_path):
    outside = tmp_path / "outside"
    root = tmp_path / "root"
    (outside / "dir").mkdir(parents=True)
    root.mkdir()
    (outside / "secret.wav").write_bytes(b"x")
    (outside / "dir" / "deep.wav").write_bytes(b"x")
    os.symlink(outside / "secret.wav", root / "escape.wav")
    os.symlink(outside / "dir", root / "linked_dir")
    os.symlink(root / "missing.wav", root / "broken.wav")
    assert _relatives(root) == []


def test_symlinked_file_inside_the_root_is_kept_under_its_link_path(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "song.flac").write_bytes(b"x")
    os.symlink(tmp_path / "real" / "song.flac", tmp_path / "alias.flac")
    sources = discover_audio(tmp_path)
    assert [s.relative for s in sources] == ["alias.flac", "real/song.flac"]
    assert sources[0].path == tmp_path / "alias.flac"
    assert sources[0].track_id != sources[1].track_id


def test_root_reached_through_a_symlink_still_accepts_links_inside_it(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "song.wav").write_bytes(b"x")
    os.symlink(tmp_path / "real" / "song.wav", tmp_path / "real" / "alias.wav")
    os.symlink(tmp_path / "real", tmp_path / "via")
    assert _relatives(tmp_path / "via") == ["alias.wav", "song.wav"]


def test_audio_source_at_agrees_with_the_walk_for_every_path_a_watcher_can_report(tmp_path):
    outside, real = tmp_path / "outside", tmp_path / "real"
    for name in ("secret.wav", "dir/deep.wav"):
        (outside / name).parent.mkdir(parents=True, exist_ok=True)
        (outside / name).write_bytes(b"x")
    for name in ("song.wav", "a/B.FLAC", ".hidden.wav", "._song.wav", ".cache/x.wav", "notes.txt", "a/b/c.ogg"):
        (real / name).parent.mkdir(parents=True, exist_ok=True)
        (real / name).write_bytes(b"x")
    os.symlink(outside / "secret.wav", real / "escape.wav")
    os.symlink(outside / "dir", real / "linked_out")
    os.symlink(real / "a", real / "alias")  # a watcher may report a/B.FLAC as alias/B.FLAC
    os.symlink(real / "song.wav", real / "link_in.wav")
    os.symlink(real, tmp_path / "via")
    # Paths as watchers report them: under symlinked folders (inotify) and under the resolved root (macOS).
    reported = [os.path.join(d, f) for top in (real, tmp_path / "via")
                for d, _, files in os.walk(top, followlinks=True) for f in files]
    for root in (real, tmp_path / "via"):
        found = {s for p in reported if (s := audio_source_at(root, p)) is not None}
        assert sorted(found, key=lambda s: s.relative) == discover_audio(root)
        assert [s.relative for s in discover_audio(root)] == ["a/B.FLAC", "a/b/c.ogg", "link_in.wav", "song.wav"]
    assert audio_source_at(real, real / "alias" / "B.FLAC").relative == "a/B.FLAC"
    assert audio_source_at(real, real / "linked_out" / "deep.wav") is None
    assert audio_source_at(real, real) is None
    assert audio_source_at(real, real / "gone.wav") is None


def test_missing_or_non_directory_root_is_refused_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        discover_audio(tmp_path / "nope")
    (tmp_path / "file.wav").write_bytes(b"x")
    with pytest.raises(NotADirectoryError, match="not a directory"):
        discover_audio(tmp_path / "file.wav")


def test_same_stem_in_two_folders_gets_two_ids(tmp_path):
    for name in ["disc1/01.wav", "disc2/01.wav", "disc1_01.wav", "disc1/01.flac"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    ids = [s.track_id for s in discover_audio(tmp_path)]
    assert len(set(ids)) == 4


def test_track_id_is_readable_slug_plus_hash_of_the_relative_path():
    digest = hashlib.sha256(b"Album/01 Intro.wav").hexdigest()[:12]
    assert make_track_id("Album/01 Intro.wav") == f"Album_01_Intro-{digest}"


def test_track_id_does_not_depend_on_unicode_normal_form():
    composed = unicodedata.normalize("NFC", "Café/Élan.wav")
    decomposed = unicodedata.normalize("NFD", "Café/Élan.wav")
    assert composed != decomposed
    assert make_track_id(composed) == make_track_id(decomposed)
    assert make_track_id(composed).startswith("Cafe_Elan-")


@pytest.mark.parametrize("relative", [
    "../../etc/passwd.wav",
    "..wav",
    ".hidden.wav",
    "-rf --no-preserve-root.wav",
    "a/\"quoted\" and 'single'.mp3",
    "  spaces  everywhere  .flac",
    "日本語のタイトル.ogg",
    "emoji 🎵 song.aiff",
    "tab\tnew\nline.wav",
    "not utf8 \udce9.wav",
    "x" * 500 + ".wav",
    "/".join(["deep"] * 80) + "/song.wav",
])
def test_hostile_names_give_safe_stable_ids(relative):
    track_id = make_track_id(relative)
    assert _SAFE_ID.fullmatch(track_id)
    assert not track_id.startswith(("-", "."))
    assert ".." not in track_id
    assert len(track_id) <= 100
    assert make_track_id(relative) == track_id


def test_make_track_id_without_normalising_hashes_the_exact_spelling():
    digest = hashlib.sha256(f"{NFD_CAFE}.wav".encode()).hexdigest()[:12]
    assert make_track_id(f"{NFD_CAFE}.wav", normalise=False) == f"cafe-{digest}"
    assert make_track_id(f"{NFD_CAFE}.wav", normalise=False) != make_track_id(f"{NFD_CAFE}.wav")
    assert make_track_id(f"{NFC_CAFE}.wav", normalise=False) == make_track_id(f"{NFC_CAFE}.wav")


def test_twins_are_two_tracks_and_the_nfc_one_keeps_its_id(tmp_path, caplog):
    skip_unless_twins_can_exist(tmp_path)
    nfc, nfd = f"{NFC_CAFE}.wav", f"{NFD_CAFE}.wav"
    ids_by_creation_order = []
    for first, order in (("nfc_first", (nfc, nfd)), ("nfd_first", (nfd, nfc))):
        for name in order:
            write_audio(tmp_path / first / name, frequency=440 if name == nfc else 660)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="mess_ai.audio.discovery"):
            sources = discover_audio(tmp_path / first)
        (record,) = caplog.records
        assert "different files" in record.getMessage()
        assert "differ only in Unicode normalisation" in record.getMessage()
        assert ascii(nfc) in record.getMessage() and ascii(nfd) in record.getMessage()
        assert discover_audio(tmp_path / first) == sources
        ids = {s.relative: s.track_id for s in sources}
        assert sorted(ids) == sorted([nfc, nfd])
        assert ids[nfc] == make_track_id(nfc)
        assert ids[nfd] == make_track_id(nfd, normalise=False) != ids[nfc]
        assert ids[nfd].startswith("cafe-")
        ids_by_creation_order.append(ids)
    assert ids_by_creation_order[0] == ids_by_creation_order[1]


def test_folder_twins_are_told_apart_and_files_alone_in_them_are_not(tmp_path):
    skip_unless_twins_can_exist(tmp_path)
    for name in (f"{NFC_CAFE}/a.wav", f"{NFD_CAFE}/a.wav", f"{NFD_CAFE}/b.wav"):
        write_audio(tmp_path / name)
    ids = {s.relative: s.track_id for s in discover_audio(tmp_path)}
    assert len(set(ids.values())) == 3
    assert ids[f"{NFC_CAFE}/a.wav"] == make_track_id(f"{NFC_CAFE}/a.wav")
    assert ids[f"{NFD_CAFE}/a.wav"] == make_track_id(f"{NFD_CAFE}/a.wav", normalise=False)
    assert ids[f"{NFD_CAFE}/b.wav"] == make_track_id(f"{NFC_CAFE}/b.wav")


def test_every_spelling_gets_its_own_id_even_without_an_nfc_one(tmp_path):
    skip_unless_twins_can_exist(tmp_path)
    nfc, nfd = "\u00c9\u00e9.wav", "E\u0301e\u0301.wav"
    mixed_a, mixed_b = "\u00c9e\u0301.wav", "E\u0301\u00e9.wav"
    for name in (nfc, nfd, mixed_a):
        write_audio(tmp_path / "three" / name)
    for name in (nfd, mixed_a, mixed_b):
        write_audio(tmp_path / "no_nfc" / name)
    three = {s.relative: s.track_id for s in discover_audio(tmp_path / "three")}
    assert three[nfc] == make_track_id(nfc) and len(set(three.values())) == 3
    no_nfc = {s.relative: s.track_id for s in discover_audio(tmp_path / "no_nfc")}
    assert no_nfc == {name: make_track_id(name, normalise=False) for name in (nfd, mixed_a, mixed_b)}
    assert make_track_id(nfc) not in no_nfc.values()


def test_audio_source_at_gives_twins_the_ids_of_the_walk(tmp_path):
    skip_unless_twins_can_exist(tmp_path)
    for name in (f"{NFC_CAFE}.wav", f"{NFD_CAFE}.wav", f"{NFC_CAFE}/a.wav", f"{NFD_CAFE}/a.wav",
                 f"{NFD_CAFE}/b.wav", f"{NFD_CAFE}/.a.wav", f"x/{NFD_CAFE}.flac"):
        write_audio(tmp_path / name)
    os.symlink(tmp_path, tmp_path.parent / f"{tmp_path.name}-via")
    for root in (tmp_path, tmp_path.parent / f"{tmp_path.name}-via"):
        walked = discover_audio(root)
        assert len(walked) == 6
        assert [audio_source_at(root, source.path) for source in walked] == walked


def test_a_decomposed_name_alone_keeps_the_normalised_id(tmp_path, caplog):
    skip_unless_twins_can_exist(tmp_path)
    write_audio(tmp_path / f"{NFD_CAFE}.wav")
    write_audio(tmp_path / NFD_CAFE / f"{NFD_CAFE}.wav")
    with caplog.at_level(logging.WARNING, logger="mess_ai.audio.discovery"):
        sources = discover_audio(tmp_path)
    assert [s.track_id for s in sources] == [make_track_id(f"{NFC_CAFE}.wav"),
                                             make_track_id(f"{NFC_CAFE}/{NFC_CAFE}.wav")]
    assert [audio_source_at(tmp_path, s.path) for s in sources] == sources
    assert not caplog.records
