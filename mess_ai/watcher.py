"""Watch a folder and hand over new or changed audio files in batches, once they are completely written.

A file being copied in keeps changing size and mtime; it counts as *stable* once neither has changed, and no event
came for it, for ``stable_seconds``. Files that arrive together (a burst) become one batch: the batch is handed over
once every file in it is stable and nothing new happened for ``debounce_seconds``. A file replaced under the same
name (other size or mtime than when it was last handed over) is handed over again. Which files count follows
``discover_audio``: audio extensions only, hidden and ``._`` files ignored, nothing reached through a symlinked
folder unless it is inside the root anyway.
"""

from __future__ import annotations

import collections
import logging
import os
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import watchfiles
from watchfiles import Change

from mess_ai.audio import AUDIO_EXTENSIONS, AudioSource, audio_source_at, discover_audio

log = logging.getLogger(__name__)

# (size, mtime_ns): the same notion of "changed" as the pipeline's, which reuses a file's hash while both hold.
Signature = tuple[int, int]
# on_batch(root, relative_paths, found_at_start): found_at_start are those of the batch that were in the folder,
# as they are now, when the watch began (they may well be extracted already).
BatchCallback = Callable[[Path, list[str], list[str]], None]


@dataclass
class _Pending:
    source: AudioSource
    signature: Signature
    changed_at: float


class StableBatcher:
    """The state of a watch: files waiting to become stable, and what was last handed over for each file.

    Fed with watchfiles' ``(Change, path)`` events by ``feed`` (and with a whole-folder ``rescan``), asked by
    ``poll`` for a batch. Time comes from ``clock`` only, so tests can drive it. Files that disappear before they
    are handed over are dropped and counted in ``dropped``.
    """

    def __init__(self, root: str | Path, *, stable_seconds: float = 5.0, debounce_seconds: float = 2.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if stable_seconds < 0 or debounce_seconds < 0:
            raise ValueError(f"stable_seconds ({stable_seconds}) and debounce_seconds ({debounce_seconds}) "
                             "must be >= 0")
        self.root = Path(os.path.abspath(root))
        self._real_root = os.path.realpath(self.root)
        self.stable_seconds = stable_seconds
        self.debounce_seconds = debounce_seconds
        self.clock = clock
        self.dropped: collections.Counter[str] = collections.Counter()
        self._pending: dict[str, _Pending] = {}
        self._handed_over: dict[str, Signature] = {}
        self._at_start: dict[str, Signature] = {}
        self._last_activity = float("-inf")

    @property
    def waiting(self) -> list[str]:
        """Relative paths of the files not yet handed over (still changing, or waiting for the burst to end)."""
        return sorted(self._pending)

    def feed(self, changes: Iterable[tuple[Change, str]]) -> None:
        """Take one set of watchfiles events."""
        for change, path in changes:
            # Whether the path exists now, not the kind of change, decides: one set of events may hold both the
            # deletion and the re-creation of a file replaced under the same name, in any order.
            if not os.path.lexists(path):
                self._forget(path)
            elif os.path.isdir(path) and not os.path.islink(path):
                if change == Change.added and _inside(os.path.realpath(path), self._real_root):
                    # A folder moved in brings its files without an event for each of them.
                    self._notice_folder(path)
            else:
                self._notice(audio_source_at(self.root, path))

    def rescan(self, at_start: bool = False) -> None:
        """Look at every audio file under the root: those not handed over with their current size and mtime
        wait for stability like new files. ``at_start``: the scan of what the folder held when the watch began;
        ``found_at_start`` tells those files apart once handed over."""
        now = self.clock()
        for source in discover_audio(self.root):
            if source.relative in self._pending:
                continue
            signature = _signature(source.path)
            if signature is not None and self._handed_over.get(source.relative) != signature:
                self._pending[source.relative] = _Pending(source, signature, now)
                self._last_activity = now
                if at_start:
                    self._at_start[source.relative] = signature

    def found_at_start(self, batch: list[str]) -> list[str]:
        """The files of ``batch`` (just handed over by ``poll``) that the scan at start found, unchanged since:
        already in the folder when the watch began, not new. Each file is told once."""
        return [r for r in batch if r in self._at_start and self._at_start.pop(r) == self._handed_over.get(r)]

    def poll(self) -> list[str]:
        """The relative paths of the next batch, sorted, or ``[]`` while it is not ready (or there is nothing)."""
        now = self.clock()
        for relative, pending in list(self._pending.items()):
            signature = _signature(pending.source.path)
            if signature is None:
                del self._pending[relative]
                self.dropped["vanished"] += 1
                log.debug("%s disappeared before it was complete", relative)
            elif signature != pending.signature:
                pending.signature, pending.changed_at, self._last_activity = signature, now, now
        if not self._pending or now - self._last_activity < self.debounce_seconds:
            return []
        if any(now - p.changed_at < self.stable_seconds for p in self._pending.values()):
            return []
        batch = sorted(r for r, p in self._pending.items() if self._handed_over.get(r) != p.signature)
        self._handed_over.update((r, p.signature) for r, p in self._pending.items())
        self._pending.clear()
        return batch

    def _notice(self, source: AudioSource | None) -> None:
        if source is None:
            return
        now = self.clock()
        pending = self._pending.get(source.relative)
        if pending is not None:
            # An event counts as a change even when size and mtime look the same (coarse mtimes on FAT, SMB).
            pending.changed_at = now
        else:
            signature = _signature(source.path)
            if signature is None:
                return
            self._pending[source.relative] = _Pending(source, signature, now)
        self._last_activity = now

    def _notice_folder(self, folder: str) -> None:
        for directory, subfolders, files in os.walk(folder):
            subfolders[:] = [name for name in subfolders if not name.startswith(".")]
            for name in files:
                self._notice(audio_source_at(self.root, os.path.join(directory, name)))

    def _forget(self, path: str) -> None:
        """Drop a deleted file, or everything under a deleted folder, so a file put back is handed over again."""
        relative = os.path.relpath(os.path.abspath(path), self.root).replace(os.sep, "/")
        if relative.lower().endswith(AUDIO_EXTENSIONS):
            keys = [relative]
        else:  # a folder, probably: going through every key is worth it only then
            keys = [k for k in {**self._pending, **self._handed_over} if k.startswith(relative + "/")]
        for key in keys:
            if self._pending.pop(key, None) is not None:
                self.dropped["deleted"] += 1
            self._handed_over.pop(key, None)
            self._at_start.pop(key, None)


def _inside(path: str, folder: str) -> bool:
    return path == folder or os.path.commonpath([folder, path]) == folder


def _signature(path: Path) -> Signature | None:
    """Size and mtime of a regular file (through a symlink), or None when it is gone or not a file."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_size, st.st_mtime_ns) if stat.S_ISREG(st.st_mode) else None


def watch_folder(root: str | Path, on_batch: BatchCallback, *, stable_seconds: float = 5.0,
                 debounce_seconds: float = 2.0, stop_event: threading.Event | None = None,
                 rescan_seconds: float | None = None, initial_scan: bool = True) -> None:
    """Watch ``root`` until ``stop_event`` is set (or Ctrl-C), calling ``on_batch(root, relative_paths,
    found_at_start)`` for each batch of complete new or changed audio files.

    ``initial_scan`` hands over the files already there at start too (the pipeline skips the unchanged ones), named
    in ``found_at_start``, as they may well be extracted already;
    ``rescan_seconds`` also looks at the whole folder that often, for events a file system does not deliver
    (network shares). ``on_batch`` runs in this thread: events that come meanwhile are kept and handled after it.
    Raises ``FileNotFoundError`` / ``NotADirectoryError`` for an unusable root.
    """
    root_path = Path(os.path.abspath(root))
    if not root_path.is_dir():
        raise (NotADirectoryError if root_path.exists() else FileNotFoundError)(
            f"audio folder does not exist or is not a folder: {root_path}")
    if rescan_seconds is not None and rescan_seconds <= 0:
        raise ValueError(f"rescan_seconds must be > 0, got {rescan_seconds}")
    batcher = StableBatcher(root_path, stable_seconds=stable_seconds, debounce_seconds=debounce_seconds)
    # Stability is checked on every wake-up, so wake up a few times per stable/debounce period even without events.
    tick_ms = int(min(max(min(stable_seconds, debounce_seconds) * 1000 / 4, 50), 1000))
    scan_due = initial_scan
    last_scan = time.monotonic()
    for changes in watchfiles.watch(root_path, watch_filter=None, debounce=tick_ms, rust_timeout=tick_ms,
                                    yield_on_timeout=True, stop_event=stop_event, ignore_permission_denied=True):
        batcher.feed(changes)
        # The first scan runs once the watcher is running, so a file written in between is not missed.
        if scan_due or (rescan_seconds is not None and time.monotonic() - last_scan >= rescan_seconds):
            batcher.rescan(at_start=scan_due)
            scan_due, last_scan = False, time.monotonic()
        batch = batcher.poll()
        if batch:
            on_batch(root_path, batch, batcher.found_at_start(batch))
