"""What a feature store must look like after anything at all happened to a run: checks shared by the fault tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mess_ai.audio import discover_audio
from mess_ai.store import DONE, FAILED, PENDING, FeatureStore, check_store, load_npy
from mess_ai.store.atomic import TEMP_MARKER
from mess_ai.store.keys import sha256_file

TEMP_PROBLEM = "temporary file left by an interrupted write"


def left_by_an_interrupted_run(problem) -> bool:
    """What ``check`` may find right after a kill, and the next run clears: a temporary file, or a finished
    feature file of a track whose row is pending (its run was killed before marking it done, or while it was
    re-extracting a changed file). Nothing reads either: readers go by the done rows."""
    return problem.reason == TEMP_PROBLEM or (problem.reason.startswith("orphan ")
                                               and problem.reason.endswith(" file (pending)"))


def temp_files(store: str | Path) -> list[Path]:
    return sorted(p for p in Path(store).rglob(f"*{TEMP_MARKER}*") if p.is_file())


def feature_files(store: str | Path) -> list[Path]:
    """Every finished feature file (not a temporary one) in every dataset."""
    return sorted(p for p in Path(store).rglob("*.npy") if TEMP_MARKER not in p.name)


def assert_no_partial_files(store: str | Path) -> int:
    """Every finished feature file reads back whole, as a finite array; returns how many there are."""
    files = feature_files(store)
    for path in files:
        array = load_npy(path)  # raises on a file shorter than its header promises
        assert np.isfinite(array).all(), f"{path} holds non-finite values"
    return len(files)


def rows(store: str | Path, dataset: str, manifest_url: str | None = None) -> dict[str, dict]:
    fs = FeatureStore(store, dataset, manifest_url)
    try:
        return fs.manifest.rows_by_track(dataset)
    finally:
        fs.close()


def assert_consistent_after_crash(store: str | Path, dataset: str, audio: str | Path,
                                  manifest_url: str | None = None) -> dict[str, int]:
    """The store as a killed or crashed run may leave it: no partial feature file, every manifest row names a
    discovered file and is done (with valid files), failed or pending, and ``check`` finds nothing but what an
    interrupted run leaves (``left_by_an_interrupted_run``). Returns the number of rows per status."""
    assert_no_partial_files(store)
    sources = {s.track_id: s for s in discover_audio(audio)}
    found = rows(store, dataset, manifest_url)
    assert set(found) <= set(sources), f"rows for files that are not there: {set(found) - set(sources)}"
    counts = {DONE: 0, FAILED: 0, PENDING: 0}
    for track_id, row in found.items():
        assert row["status"] in counts, row
        counts[row["status"]] += 1
        assert row["relative_path"] == sources[track_id].relative
    report = check_store(store, dataset, manifest_url)
    unexpected = [p for p in report.problems if not left_by_an_interrupted_run(p)]
    assert not unexpected, unexpected
    return counts


def assert_complete(store: str | Path, dataset: str, audio: str | Path, keep_raw: bool = False,
                    manifest_url: str | None = None) -> None:
    """Every discovered file is done, from its current bytes, with exactly one file per scale; ``check`` is clean
    and no temporary file is left."""
    report = check_store(store, dataset, manifest_url)
    assert report.ok, report.problems
    assert not temp_files(store), temp_files(store)
    sources = {s.track_id: s for s in discover_audio(audio)}
    found = rows(store, dataset, manifest_url)
    assert set(found) == set(sources), set(found) ^ set(sources)
    for track_id, row in found.items():
        assert row["status"] == DONE, row
        assert row["sha256"] == sha256_file(sources[track_id].path), f"{row['relative_path']}: stale sha256"
    scales = ("segments", "aggregated", "raw") if keep_raw else ("segments", "aggregated")
    for scale in scales:
        names = sorted(p.stem for p in (Path(store) / dataset / scale).glob("*.npy"))
        assert names == sorted(sources), f"{scale}: {set(names) ^ set(sources)}"
