"""Which files a run works on: a pure function of the manifest's rows, the files' state and the content key.

The session gathers the inputs (each file's row, the hash of its bytes where the plan needs it, whether its stored
features read back) and applies the decisions; nothing here reads a file, the store or the model. A file is
"already done" when its row has the content key of this run and the sha256 of its bytes now, never by its name.
"""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from mess_ai.audio.loading import decoded_with_mp3_glitches
from mess_ai.extraction.stats import FileOutcome
from mess_ai.store import DONE, FAILED, PENDING, ExpectedShapes

Row = Mapping[str, Any]

# The manifest columns the plan reads of a row (``decide`` and what it calls, and the outcome of a file that failed
# before): a run reads no more of each file's row.
PLAN_COLUMNS = ("track_id", "status", "sha256", "size", "mtime_ns", "file_identity", "config_key", "permanent",
                "unfinished", "n_windows", "failure_stage", "error_class", "error_message", "attempts",
                "duration_seconds", "decoder_revision")


class Decision(str, enum.Enum):
    """What a run does with one file."""

    UNCHANGED = "unchanged"  # done with these bytes and this config, its features in place: skipped
    # (unless they were decoded with a bug fixed since: see ``decoded_with_mp3_glitches``)
    PREVIOUSLY_FAILED = "previously_failed"  # failed for good on these bytes: not retried until they change
    TO_DO = "to_do"  # new, changed, failed in a way worth another try, or given back by a stopped run
    SUSPECT = "suspect"  # to do, and a process died during its last attempt: extracted alone, first
    NOT_SELECTED = "not_selected"  # outside this run's choice (the failed files only, or a shard's own)

    @property
    def needs_work(self) -> bool:
        return self in (Decision.TO_DO, Decision.SUSPECT)


@dataclass(frozen=True)
class Selection:
    """The files a run takes: all of them, those whose last attempt failed (``only_failed``), or those named in
    ``files`` (paths relative to the audio folder)."""

    only_failed: bool = False
    files: frozenset[str] | None = None

    def takes(self, relative: str, row: Row | None) -> bool:
        if self.files is not None and relative not in self.files:
            return False
        return not self.only_failed or (row is not None and row["status"] == FAILED)


@dataclass(frozen=True)
class FileState:
    """What the session found out about one file: its manifest ``row`` (None for a file never attempted), the
    ``sha256`` of its bytes now where the plan needs it (None: not needed, or the file cannot be read now), and
    whether its stored features read back with the shapes its row and the dataset's provenance give."""

    relative: str
    row: Row | None
    sha256: str | None = None
    outputs_valid: bool = False


def file_identity(stat: os.stat_result) -> str:
    """'<inode>:<ctime_ns>': with size and mtime, what says a file still holds the bytes hashed earlier. A copy
    that keeps size and mtime (``cp -p``, ``rsync -t``) is a new inode, or at least a new change time, which no
    tool can set back. (Not the device: a network mount has another on each machine sharing a manifest.)"""
    return f"{stat.st_ino}:{stat.st_ctime_ns}"


def known_sha256(row: Row | None, stat: os.stat_result) -> str | None:
    """The row's sha256 while the file's size, mtime and identity are those it was hashed with, else None (the
    bytes must be read). A row of an earlier version without an identity is trusted on size and mtime."""
    if row is None or not row["sha256"] or row["size"] != stat.st_size or row["mtime_ns"] != stat.st_mtime_ns:
        return None
    return row["sha256"] if row.get("file_identity") in (None, file_identity(stat)) else None


def needs_content(relative: str, row: Row | None, key: str, selection: Selection = Selection()) -> bool:
    """Whether ``decide`` looks at the file's bytes: a file this run takes whose row, of this content key, is done
    or failed (a failed-only run retries its files whatever their bytes)."""
    return (selection.takes(relative, row) and not selection.only_failed and row is not None
            and row["config_key"] == key and row["status"] in (DONE, FAILED))


def outputs_to_check(row: Row | None, sha256: str | None, provenance: Mapping[str, Any],
                     key: str) -> ExpectedShapes | None:
    """The shapes a done file's stored features must have for ``decide`` to skip it: None when it does not
    matter (the row is not done, the bytes changed, or the dataset's provenance is another config's)."""
    if row is None or row["status"] != DONE or sha256 is None or sha256 != row["sha256"]:
        return None
    if provenance.get("config_key") != key:
        return None
    return ExpectedShapes(row["n_windows"], provenance["num_hidden_states"], provenance["hidden_size"])


def decide(file: FileState, key: str, selection: Selection = Selection()) -> Decision:
    """What to do with one file, for a run whose content key is ``key``."""
    row = file.row
    if not selection.takes(file.relative, row):
        return Decision.NOT_SELECTED
    if selection.only_failed:
        return Decision.TO_DO
    same_bytes = row is not None and row["config_key"] == key and file.sha256 is not None \
        and file.sha256 == row["sha256"]
    if same_bytes and row["status"] == DONE and file.outputs_valid and not decoded_with_mp3_glitches(
            file.relative, row.get("duration_seconds"), row.get("decoder_revision")):
        return Decision.UNCHANGED
    if same_bytes and row["status"] == FAILED and row["permanent"]:
        return Decision.PREVIOUSLY_FAILED
    if row is not None and row["status"] == PENDING and (row.get("unfinished") or 0) > 0:
        return Decision.SUSPECT
    return Decision.TO_DO


def plan_files(files: Sequence[FileState], key: str, selection: Selection = Selection()) -> list[Decision]:
    """``decide`` for each of ``files``, in their order."""
    return [decide(file, key, selection) for file in files]


def settled_outcome(track_id: str, relative: str, row: Row | None, decision: Decision) -> FileOutcome | None:
    """The outcome the plan settles by itself: unchanged, or failed before on the same bytes (with the stage and
    reason of that failure); None for a file the run works on or does not select."""
    if decision == Decision.UNCHANGED:
        return FileOutcome(track_id, relative, "unchanged")
    if decision == Decision.PREVIOUSLY_FAILED:
        return FileOutcome(track_id, relative, "previously_failed", row["failure_stage"], row["error_class"],
                           row["error_message"], row["attempts"], row["duration_seconds"], permanent=True)
    return None
