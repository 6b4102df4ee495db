"""Integrity check of a feature store: every done track has valid files, and nothing else is lying around."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Collection

import numpy as np

from mess_ai.store.atomic import load_npy, read_npy_header, target_of_temp
from mess_ai.store.layout import SCALES, FeatureStore
from mess_ai.store.manifest import DONE, Manifest


@dataclass(frozen=True)
class Problem:
    dataset: str
    track_id: str | None
    path: str | None
    reason: str


@dataclass
class IntegrityReport:
    datasets: list[str] = field(default_factory=list)
    tracks_checked: int = 0
    files_checked: int = 0
    problems: list[Problem] = field(default_factory=list)
    # What was checked, in words ("the 40 tracks this run extracted or failed").
    scope: str = "every track"

    @property
    def ok(self) -> bool:
        return not self.problems

    def lines(self) -> list[str]:
        """Each problem in one line: the file (or track) and what is wrong with it."""
        return [f"{p.path or p.track_id}: {p.reason}" for p in self.problems]

    def describe(self) -> str:
        """'Store check of the 40 tracks this run extracted or failed: valid files, nothing stray.', or the number
        of problems and the first five."""
        if self.ok:
            return f"Store check of {self.scope}: valid files, nothing stray."
        lines = self.lines()
        more = f"; and {len(lines) - 5} more" if len(lines) > 5 else ""
        problems = f"{len(lines)} problem{'' if len(lines) == 1 else 's'}"
        return f"Store check of {self.scope}: {problems}: " + "; ".join(lines[:5]) + more

    def to_dict(self) -> dict:
        return {"ok": self.ok, "datasets": self.datasets, "tracks_checked": self.tracks_checked,
                "files_checked": self.files_checked, "problems": [asdict(p) for p in self.problems]}


def _check_file(path: Path, expected: tuple[int | None, ...], dtype: np.dtype, full: bool) -> str | None:
    """None when the file is an array of the expected shape and dtype, and with ``full`` every value is finite
    (None in ``expected`` matches any size). Without ``full`` only the header is read, and the file's length
    checked against it."""
    if not path.exists():
        return "missing"
    array = None
    try:
        if full:
            array = load_npy(path, mmap=True)
            shape, found = array.shape, array.dtype
        else:
            shape, found = read_npy_header(path)
    except (OSError, ValueError) as exc:
        return f"unreadable: {exc}"
    if found != dtype:
        return f"dtype {found}, expected {dtype}"
    if len(shape) != len(expected) or any(e is not None and a != e for a, e in zip(shape, expected)):
        shown = "[" + ", ".join("*" if e is None else str(e) for e in expected) + "]"
        return f"shape {list(shape)}, expected {shown}"
    if array is not None:
        # Checked in blocks so a raw file of many GB never has to fit in memory.
        step = max(1, (64 << 20) // max(1, array[0:1].nbytes))
        for start in range(0, array.shape[0], step):
            if not np.isfinite(array[start:start + step]).all():
                return "contains non-finite values (NaN or inf)"
    return None


def check_dataset(store: FeatureStore, report: IntegrityReport, check_values: bool = True,
                  track_ids: Collection[str] | None = None) -> None:
    """Check one dataset of a store, adding what is wrong to ``report``: every track, or with ``track_ids`` those
    only (their rows, their feature files, files of theirs without a row, their temporary files), read by key so
    that the cost follows them and not the dataset's size. The dataset's provenance and config mix either way."""
    dataset = store.dataset
    report.datasets.append(dataset)
    provenance = store.read_provenance() or {}
    n_states = provenance.get("num_hidden_states")
    hidden = provenance.get("hidden_size")
    scoped = None if track_ids is None else set(track_ids)
    rows = store.manifest.rows_by_track(dataset) if scoped is None else store.manifest.rows_of(dataset, sorted(scoped))
    done = {tid: row for tid, row in rows.items() if row["status"] == DONE}
    # Tracks whose last attempt failed (or is under way) keep the features of an earlier extraction.
    kept = {tid: row for tid, row in rows.items() if row["status"] != DONE and row.get("features_config_key")}
    if done and not provenance:
        report.problems.append(Problem(dataset, None, str(store.provenance_path), "provenance file is missing"))
    mix = config_mix(store.manifest, dataset)
    if mix:
        report.problems.append(Problem(dataset, None, str(store.dataset_dir), mix))

    for track_id, row in [*done.items(), *kept.items()]:
        report.tracks_checked += 1
        n_windows = row["n_windows"] if row["status"] == DONE else row["features_n_windows"]
        expected = {
            "segments": ((n_windows, n_states, hidden), np.dtype(np.float32)),
            "aggregated": ((n_states, hidden), np.dtype(np.float32)),
        }
        for scale, (shape, dtype) in expected.items():
            path = store.path(scale, track_id)
            report.files_checked += 1
            reason = _check_file(path, shape, dtype, check_values)
            if reason:
                report.problems.append(Problem(dataset, track_id, str(path), f"{scale}: {reason}"))
        raw_path = store.path("raw", track_id)
        if raw_path.exists():
            report.files_checked += 1
            reason = _check_file(raw_path, (n_windows, n_states, None, hidden), np.dtype(np.float16), check_values)
            if reason:
                report.problems.append(Problem(dataset, track_id, str(raw_path), f"raw: {reason}"))

    listed = store.feature_files() if scoped is None else (
        (scale, store.path(scale, track_id)) for track_id in sorted(scoped) for scale in SCALES
        if store.path(scale, track_id).exists())
    for scale, path in listed:
        if path.stem in done or path.stem in kept or store.lock(path.stem).held_elsewhere():
            continue
        # The rows were read before the files were listed: a run may have finished this track since (written its
        # files, marked it done, released its lock). Its row now, read after the lock was seen free, is the truth.
        row = store.manifest.get(dataset, path.stem)
        if row is not None and (row["status"] == DONE or row.get("features_config_key")):
            continue
        status = row["status"] if row is not None else "no manifest row"
        report.problems.append(Problem(dataset, path.stem, str(path), f"orphan {scale} file ({status})"))
    # A run that settled no track has no temporary files of its own to look for (its start swept the others).
    for temp in store.temp_files() if scoped is None or scoped else ():
        target = target_of_temp(temp)
        if scoped is not None and target is not None and target.parent != store.dataset_dir \
                and target.stem not in scoped:
            continue  # another track's: not this check's
        if store.temp_in_use(temp) or not temp.exists():
            continue  # a run is writing it right now, or has just renamed it into place
        report.problems.append(Problem(dataset, None, str(temp), "temporary file left by an interrupted write"))


def describe_config(description: dict | None) -> str:
    """'model m-a-p/MERT-v1-95M (weights <id>@<commit>), window 5.0 s, hop 2.5 s, bf16'."""
    if not description:
        return "a config recorded before mess-ai kept dataset configs"
    return (f"model {description.get('model')} (weights {str(description.get('model_fingerprint'))[:24]}), "
            f"window {description.get('window_seconds')} s, hop {description.get('hop_seconds')} s, "
            f"{description.get('precision')}")


def config_mix(manifest: Manifest, dataset: str) -> str | None:
    """None when every track's features come from the dataset's config; else a sentence saying the mix: how many
    tracks hold features of which config (a re-extraction under way, or stopped before its end)."""
    counts = manifest.feature_configs(dataset)
    record = manifest.dataset_record(dataset)
    current = record["config_key"] if record else None
    if len(counts) <= 1 and (current is None or set(counts) <= {current}):
        return None
    configs = record["configs"] if record else {}
    parts = [f"{count} tracks with {describe_config(configs.get(key))} [{key}]"
             + (" (the dataset's config)" if key == current else "")
             for key, count in sorted(counts.items(), key=lambda item: item[0] != current)]
    return ("mixed configs: " + "; ".join(parts) + ". A re-extraction is under way or was stopped: run the "
            "extraction again with the dataset's config until every track is redone")


def check_store(root: str | Path, dataset: str | None = None, manifest_url: str | None = None,
                check_values: bool = True) -> IntegrityReport:
    """Check one dataset, or every dataset folder of the store when ``dataset`` is None."""
    root = Path(root)
    report = IntegrityReport()
    if not root.is_dir():
        report.problems.append(Problem(dataset or "", None, str(root), "store folder does not exist"))
        return report
    names = [dataset] if dataset else sorted(
        p.name for p in root.iterdir()
        if p.is_dir() and not p.name.startswith(".")
        and (any((p / s).is_dir() for s in SCALES) or (p / "provenance.json").exists())
    )
    for name in names:
        if not (root / name).is_dir():
            report.problems.append(Problem(name, None, str(root / name), "dataset folder does not exist"))
            continue
        store = FeatureStore(root, name, manifest_url)
        try:
            check_dataset(store, report, check_values)
        finally:
            store.close()
    return report
