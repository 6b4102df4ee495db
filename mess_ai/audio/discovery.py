"""Find the audio files under a folder and give each a stable, file-name-safe track id."""

from __future__ import annotations

import hashlib
import os
import posixpath
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3", ".aif", ".aiff")

_TRACK_ID_MAX_CHARS = 100
_HASH_CHARS = 12
_SLUG_MAX_CHARS = _TRACK_ID_MAX_CHARS - _HASH_CHARS - 1
# Dots are left out on purpose: no ".." and no leading "." can ever appear in an id.
_NOT_SLUG = re.compile(r"[^A-Za-z0-9_-]+")


@dataclass(frozen=True)
class AudioSource:
    """One audio file found under a root.

    ``path`` is absolute but not resolved (a symlinked file keeps its link path), ``relative`` is the POSIX path
    from the root, ``track_id`` is ``make_track_id(relative)``.
    """

    path: Path
    relative: str
    track_id: str


def discover_audio(root: str | Path) -> list[AudioSource]:
    """Every audio file under ``root``, recursively, sorted by relative path.

    Hidden entries (``.*``, which includes macOS ``._*`` resource forks) are skipped, and so are directories whatever
    their name. Symlinked directories are never entered, so a symlink loop cannot trap the walk; a symlinked file is
    kept only if it resolves to a regular file inside the resolved root. Subfolders that cannot be listed are
    skipped; an unusable root raises ``FileNotFoundError`` / ``NotADirectoryError`` / ``PermissionError``.
    """
    root_path = os.path.abspath(os.fspath(root))
    if not os.path.exists(root_path):
        raise FileNotFoundError(f"audio folder does not exist: {root_path}")
    if not os.path.isdir(root_path):
        raise NotADirectoryError(f"audio folder is not a directory: {root_path}")
    real_root = os.path.realpath(root_path)

    found: list[AudioSource] = []
    # (absolute dir, its POSIX path relative to the root) pairs still to list.
    pending: list[tuple[str, str]] = [(root_path, "")]
    while pending:
        directory, rel_dir = pending.pop()
        try:
            with os.scandir(directory) as it:
                entries = list(it)
        except OSError:
            if directory == root_path:
                raise
            continue
        for entry in entries:
            if entry.name.startswith("."):
                continue
            relative = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
            # DirEntry answers is_dir/is_symlink from the directory listing itself: no stat per file.
            if entry.is_dir(follow_symlinks=False):
                pending.append((entry.path, relative))
            elif entry.name.lower().endswith(AUDIO_EXTENSIONS) and _is_usable_file(entry, real_root):
                found.append(AudioSource(Path(entry.path), relative, make_track_id(relative)))
    found.sort(key=lambda source: source.relative)
    return found


def _is_usable_file(entry: os.DirEntry, real_root: str) -> bool:
    """A regular file, or a symlink whose target is a regular file inside the root (broken links are not)."""
    if not entry.is_symlink():
        return entry.is_file(follow_symlinks=False)
    target = os.path.realpath(entry.path)
    return os.path.isfile(target) and os.path.commonpath([real_root, target]) == real_root


def make_track_id(relative: str) -> str:
    """A unique, stable, file-name-safe id for the file at POSIX path ``relative`` under the root.

    A readable slug of the path without its extension, then ``-`` and 12 hex digits of the SHA-256 of the whole
    NFC-normalised path. The hash makes ids unique where slugs collide (``a/b.wav`` and ``a_b.wav``, ``x.wav`` and
    ``x.flac``); NFC makes the id the same whether the file system stores names composed (Linux) or decomposed
    (macOS). The id uses only ``[A-Za-z0-9_-]``, never starts with ``-`` and has at most 100 characters.
    """
    normalised = unicodedata.normalize("NFC", relative)
    # surrogateescape gives back the original bytes of names that are not valid UTF-8 instead of failing.
    digest = hashlib.sha256(normalised.encode("utf-8", "surrogateescape")).hexdigest()[:_HASH_CHARS]
    stem = posixpath.splitext(normalised)[0]
    # Dropping combining marks after NFKD keeps accented names readable ("Café" -> "Cafe").
    ascii_stem = "".join(c for c in unicodedata.normalize("NFKD", stem) if not unicodedata.combining(c))
    slug = _NOT_SLUG.sub("_", ascii_stem)[:_SLUG_MAX_CHARS].strip("_-")
    return f"{slug}-{digest}" if slug else digest
