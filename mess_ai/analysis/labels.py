"""Track labels for analysis: a CSV with a ``file`` column and any label columns, or the tracks' top folders."""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Sequence

from mess_ai.analysis.loading import TrackInfo, match_track

log = logging.getLogger(__name__)

FILE_COLUMN = "file"
FOLDER_LABEL = "folder"

# label column -> one label per track (None: no label), in the order of the dataset's tracks.
Labels = dict[str, list[str | None]]


def read_labels_csv(path: str | Path, tracks: Sequence[TrackInfo]) -> tuple[Labels, list[str]]:
    """Labels from a CSV whose ``file`` column names a track (file name, path relative to the audio folder, or
    track id); every other column is a label. Empty cells mean "no label". Tracks without a row have no label.
    Also returns the notes for the report: rows naming recordings that are not extracted (labels of a whole
    corpus, a few files extracted so far) are left out, with a logged warning that says how many.

    ValueError, naming the rows, for a missing ``file`` column, no label column, a name matching several tracks,
    two rows naming the same track, or no row naming an extracted track.
    """
    path = Path(path)
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        columns = [c.strip() for c in reader.fieldnames or []]
        if FILE_COLUMN not in columns:
            raise ValueError(f"{path}: no {FILE_COLUMN!r} column (columns: {', '.join(columns) or 'none'})")
        reader.fieldnames = columns
        label_columns = [c for c in columns if c and c != FILE_COLUMN]
        if not label_columns:
            raise ValueError(f"{path}: no label column besides {FILE_COLUMN!r}")
        labels: Labels = {c: [None] * len(tracks) for c in label_columns}
        unknown, seen = [], {}
        for row in reader:
            name = (row.get(FILE_COLUMN) or "").strip()
            try:
                index = match_track(name, tracks) if name else None
            except ValueError as exc:  # a file name several tracks have
                raise ValueError(f"{path}, line {reader.line_num}: {exc}") from None
            if index is None:
                unknown.append(f"{name!r} (line {reader.line_num})")
                continue
            if index in seen:
                raise ValueError(f"{path}: lines {seen[index]} and {reader.line_num} both label track "
                                 f"{tracks[index].relative_path}")
            seen[index] = reader.line_num
            for column in label_columns:
                value = (row.get(column) or "").strip()
                labels[column][index] = value or None
    if not seen and not unknown:
        raise ValueError(f"{path}: no rows")
    examples = ", ".join(unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
    if not seen:
        raise ValueError(f"{path}: none of its {len(unknown)} rows names an extracted track of the dataset "
                         f"({len(tracks)} tracks): {examples}")
    notes = []
    if unknown:
        notes.append(f"{path}: {len(unknown)} of {len(unknown) + len(seen)} rows name recordings that are not "
                     f"extracted ({examples}); the analysis uses the labels of the {len(seen)} that are extracted")
        log.warning("%s", notes[-1])
    return labels, notes


def folder_labels(tracks: Sequence[TrackInfo]) -> Labels | None:
    """Each track's top folder under the audio folder as a label, when the tracks lie in at least two folders."""
    folders = [t.relative_path.split("/", 1)[0] if "/" in t.relative_path else None for t in tracks]
    if len({f for f in folders if f is not None}) < 2:
        return None
    return {FOLDER_LABEL: folders}
