"""Track labels for analysis: a CSV with a ``file`` column and any label columns, or the tracks' top folders."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Sequence

from mess_ai.analysis.loading import TrackInfo, match_track

FILE_COLUMN = "file"
FOLDER_LABEL = "folder"

# label column -> one label per track (None: no label), in the order of the dataset's tracks.
Labels = dict[str, list[str | None]]


def read_labels_csv(path: str | Path, tracks: Sequence[TrackInfo]) -> Labels:
    """Labels from a CSV whose ``file`` column names a track (file name, path relative to the audio folder, or
    track id); every other column is a label. Empty cells mean "no label". Tracks without a row have no label.

    ValueError, naming the rows, for a missing ``file`` column, no label column, rows naming no known track, or
    two rows naming the same track.
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
            index = match_track(name, tracks) if name else None
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
    if unknown:
        raise ValueError(f"{path}: {len(unknown)} of {len(unknown) + len(seen)} rows name no extracted track of the "
                         f"dataset ({len(tracks)} tracks): {', '.join(unknown[:5])}"
                         + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""))
    if not seen:
        raise ValueError(f"{path}: no rows")
    return labels


def folder_labels(tracks: Sequence[TrackInfo]) -> Labels | None:
    """Each track's top folder under the audio folder as a label, when the tracks lie in at least two folders."""
    folders = [t.relative_path.split("/", 1)[0] if "/" in t.relative_path else None for t in tracks]
    if len({f for f in folders if f is not None}) < 2:
        return None
    return {FOLDER_LABEL: folders}
