"""Find the audio files under a folder and give each a stable, file-name-safe track id."""

from __future__ import annotations

import collections
import functools
import hashlib
import logging
import os
import posixpath
import re
import stat
import unicodedata
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3", ".aif", ".aiff")

_TRACK_ID_MAX_CHARS = 100
_HASH_CHARS = 12
_SLUG_MAX_CHARS = _TRACK_ID_MAX_CHARS - _HASH_CHARS - 1
# Dots are left out on purpose: no ".." and no leading "." can ever appear in an id.
_NOT_SLUG = re.compile(r"[^A-Za-z0-9_-]+")


@dataclass(frozen=True)
class AudioSource:
    """One audio file found under a root.

    ``location`` (and ``path``, the same as a ``Path``) is absolute but not resolved (a symlinked file keeps its
    link path), ``relative`` is the POSIX path from the root, ``track_id`` is ``make_track_id(relative)``, except for
    *twins*: files whose names differ only in Unicode normalisation, which get ``make_track_id(relative,
    normalise=False)`` (see ``discover_audio``).
    """

    location: str
    relative: str
    track_id: str

    # Made when first asked for: a walk of 100,000 files spent a second making Path objects few of them need.
    @functools.cached_property
    def path(self) -> Path:
        return Path(self.location)


def discover_audio(root: str | Path) -> list[AudioSource]:
    """Every audio file under ``root``, recursively, sorted by relative path.

    Hidden entries (``.*``, which includes macOS ``._*`` resource forks) are skipped, and so are directories whatever
    their name. Symlinked directories are never entered, so a symlink loop cannot trap the walk; a symlinked file is
    kept only if it resolves to a regular file inside the resolved root. Subfolders that cannot be listed are
    skipped; an unusable root raises ``FileNotFoundError`` / ``NotADirectoryError`` / ``PermissionError``.

    Track ids: a file's id is ``make_track_id(relative)``, the same whether the file system spells its name composed
    or decomposed. Linux keeps ``café.wav`` composed (NFC) and decomposed (NFD) side by side as two different files
    (*twins*: relative paths with the same NFC form, through a file or folder name); each twin gets
    ``make_track_id(relative, normalise=False)``, hashed over its exact code points, so twins are never merged
    into one track. The twin spelt in NFC thereby keeps the usual id (an existing store keeps its features); a
    warning names each group of twins. Known consequence: the id of a twin not spelt in NFC depends on the others
    being there. When the NFC twin is removed, the one left gets the usual id back (and is extracted once more
    under it); when an NFC twin is added next to a decomposed name, the decomposed one moves to its own id the same
    way.
    """
    root_path = os.path.abspath(os.fspath(root))
    if not os.path.exists(root_path):
        raise FileNotFoundError(f"audio folder does not exist: {root_path}")
    if not os.path.isdir(root_path):
        raise NotADirectoryError(f"audio folder is not a directory: {root_path}")
    real_root = os.path.realpath(root_path)

    # NFC form of the relative path -> (absolute path, relative path) of every file spelt that way.
    found: dict[str, list[tuple[str, str]]] = collections.defaultdict(list)
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
            relative = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
            if _walked_dir(entry):
                pending.append((entry.path, relative))
            elif _listed_file(entry, real_root):
                found[unicodedata.normalize("NFC", relative)].append((entry.path, relative))
    sources = []
    for spellings in found.values():
        if len(spellings) > 1:
            _warn_twins(root_path, sorted(relative for _, relative in spellings))
        sources += [AudioSource(path, relative, make_track_id(relative, normalise=len(spellings) == 1))
                    for path, relative in spellings]
    sources.sort(key=lambda source: source.relative)
    return sources


def _walked_dir(entry: os.DirEntry) -> bool:
    # DirEntry answers is_dir/is_symlink from the directory listing itself: no stat per file.
    return not entry.name.startswith(".") and entry.is_dir(follow_symlinks=False)


def _listed_file(entry: os.DirEntry, real_root: str) -> bool:
    return (not entry.name.startswith(".") and entry.name.lower().endswith(AUDIO_EXTENSIONS)
            and _is_usable_file(entry, real_root))


def _warn_twins(root_path: str, relatives: list[str]) -> None:
    # ascii() shows the code points: printed as they are, the names look the same.
    log.warning("%d different files under %s have names that differ only in Unicode normalisation: %s. Each is "
                "kept as its own track: the one spelt in NFC (composed) keeps the usual track id, the others get "
                "an id hashed over their exact code points.",
                len(relatives), root_path, ", ".join(ascii(relative) for relative in relatives))


def _is_usable_file(entry: os.DirEntry, real_root: str) -> bool:
    """A regular file, or a symlink whose target is a regular file inside the root (broken links are not)."""
    if not entry.is_symlink():
        return entry.is_file(follow_symlinks=False)
    return _link_target_inside(entry.path, real_root)


def _link_target_inside(link: str, real_root: str) -> bool:
    target = os.path.realpath(link)
    return os.path.isfile(target) and _inside(target, real_root)


def _inside(path: str, directory: str) -> bool:
    return path != directory and os.path.commonpath([directory, path]) == directory


def audio_source_at(root: str | Path, path: str | Path) -> AudioSource | None:
    """The source ``discover_audio(root)`` lists for the file at ``path``, or None when the walk would not list it.

    For paths reported by a file watcher, which follows symlinked directories and may report paths under the
    resolved root (macOS): such a path is resolved up to its parent and kept only when that lands inside the root,
    under the relative path the walk lists. Files that are missing or vanish during the check give None.
    The track id is the walk's, twins included: a path that is not NFC has the folders along it listed for
    other spellings of the same names (an NFC path needs no listing, its id is the same either way).
    """
    root_path = os.path.abspath(os.fspath(root))
    path = os.path.abspath(os.fspath(path))
    real_root = os.path.realpath(root_path)
    relative = _relative_inside(path, root_path)
    if relative is None or _through_symlinked_dir(root_path, relative):
        resolved = os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))
        relative = _relative_inside(resolved, real_root)
        if relative is None:
            return None
    parts = relative.split("/")
    if any(part.startswith(".") for part in parts) or not parts[-1].lower().endswith(AUDIO_EXTENSIONS):
        return None
    full = os.path.join(root_path, *parts)
    try:
        mode = os.lstat(full).st_mode
    except OSError:
        return None
    usable = _link_target_inside(full, real_root) if stat.S_ISLNK(mode) else stat.S_ISREG(mode)
    if not usable:
        return None
    normalised = unicodedata.normalize("NFC", relative)
    has_twins = normalised != relative and len(_spellings(root_path, real_root, normalised)) > 1
    return AudioSource(full, relative, make_track_id(relative, normalise=not has_twins))


def _spellings(root_path: str, real_root: str, normalised: str) -> list[str]:
    """The relative paths of the files the walk lists whose NFC form is ``normalised``."""
    *folder_names, file_name = normalised.split("/")
    folders = [(root_path, "")]
    for name in folder_names:
        folders = [(entry.path, f"{rel}/{entry.name}" if rel else entry.name)
                   for folder, rel in folders for entry in _entries(folder)
                   if unicodedata.normalize("NFC", entry.name) == name and _walked_dir(entry)]
    return [f"{rel}/{entry.name}" if rel else entry.name for folder, rel in folders for entry in _entries(folder)
            if unicodedata.normalize("NFC", entry.name) == file_name and _listed_file(entry, real_root)]


def _entries(folder: str) -> list[os.DirEntry]:
    try:
        with os.scandir(folder) as it:
            return list(it)
    except OSError:
        return []


def _relative_inside(path: str, directory: str) -> str | None:
    """``path`` relative to ``directory`` as a POSIX path, or None when it is not strictly inside it."""
    if not _inside(path, directory):
        return None
    return os.path.relpath(path, directory).replace(os.sep, "/")


def _through_symlinked_dir(root_path: str, relative: str) -> bool:
    """Whether a folder on the way from the root to ``relative`` is a symlink (the walk never enters those)."""
    folder = root_path
    for part in relative.split("/")[:-1]:
        folder = os.path.join(folder, part)
        if os.path.islink(folder):
            return True
    return False


def make_track_id(relative: str, *, normalise: bool = True) -> str:
    """A unique, stable, file-name-safe id for the file at POSIX path ``relative`` under the root.

    A readable slug of the path without its extension, then ``-`` and 12 hex digits of the SHA-256 of the whole
    NFC-normalised path. The hash makes ids unique where slugs collide (``a/b.wav`` and ``a_b.wav``, ``x.wav`` and
    ``x.flac``); NFC makes the id the same whether the file system stores names composed (Linux) or decomposed
    (macOS). The id uses only ``[A-Za-z0-9_-]``, never starts with ``-`` and has at most 100 characters.

    ``normalise=False`` hashes ``relative`` exactly as spelt (same slug): for *twins*, different files whose names
    differ only in normalisation (``discover_audio`` tells when). For an NFC ``relative`` both ids are the same.
    """
    normalised = unicodedata.normalize("NFC", relative)
    hashed = normalised if normalise else relative
    # surrogateescape gives back the original bytes of names that are not valid UTF-8 instead of failing.
    digest = hashlib.sha256(hashed.encode("utf-8", "surrogateescape")).hexdigest()[:_HASH_CHARS]
    stem = posixpath.splitext(normalised)[0]
    # Dropping combining marks after NFKD keeps accented names readable ("Café" -> "Cafe"); an ASCII stem has none
    # (skipping the per-character walk matters for a folder of 100,000 files).
    ascii_stem = stem if stem.isascii() else "".join(
        c for c in unicodedata.normalize("NFKD", stem) if not unicodedata.combining(c))
    slug = _NOT_SLUG.sub("_", ascii_stem)[:_SLUG_MAX_CHARS].strip("_-")
    return f"{slug}-{digest}" if slug else digest
