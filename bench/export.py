"""export: the Parquet export of a large dataset, whole and again (incremental), side by side in one run.

A dataset of done tracks with MERT-v1-95M's shapes (13 hidden states x 768; the overhead probe as model) is filled
as for dataset-size (one track extracted, the others copies of it, see ``bench.dataset_size.fill_dataset``), each
track then given random features of its own (identical ones would compress to nothing), and exported with ``export_parquet``: once whole, once again with nothing changed, and once after one track got new
bytes (its row's sha256 and its feature files replaced), which should rewrite that track's part only. The layer is
``mean`` (one column of 768 floats) over the big dataset, and ``all`` (13 columns) over a smaller one.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import add_figure, add_target, folder_bytes, new_result
from bench.dataset_size import fill_dataset
from bench.probe import OVERHEAD_PROBE, overhead_probe

NAME = "export"
DATASET = "export"


def _distinct_features(store: Path, seed: int = 0) -> None:
    """Give every track features of its own (the fill hard-links one track's): identical vectors would compress to
    nothing in Parquet, and the export would time a case no real dataset is."""
    from mess_ai.store import FeatureStore, load_npy

    rng = np.random.default_rng(seed)
    feature_store = FeatureStore(store, DATASET)
    try:
        for scale in ("segments", "aggregated"):
            for path in sorted((feature_store.dataset_dir / scale).glob("*.npy")):
                shape = load_npy(path).shape
                path.unlink()  # a hard link of the others: a file of its own instead
                np.save(path, rng.standard_normal(shape, dtype=np.float32), allow_pickle=False)
    finally:
        feature_store.close()


def _change_one_track(store: Path, track_id: str) -> None:
    """Give ``track_id`` new bytes, as a re-extraction after its file changed leaves it: another sha256 in its row,
    new feature files (not hard links of the others' any more)."""
    from mess_ai.store import FeatureStore, load_npy
    from mess_ai.store.manifest import tracks

    feature_store = FeatureStore(store, DATASET)
    try:
        with feature_store.manifest.engine.begin() as conn:
            conn.execute(tracks.update().where(tracks.c.dataset == DATASET, tracks.c.track_id == track_id)
                         .values(sha256="f" * 64))
        segments = load_npy(feature_store.path("segments", track_id)) + 1.0
        feature_store.write_segments(track_id, segments, segments.mean(axis=0))
    finally:
        feature_store.close()


def _export(store: Path, out: Path, layer: str) -> tuple[float, Any]:
    from mess_ai.export import export_parquet

    started = time.perf_counter()
    summary = export_parquet(store, out, DATASET, layer)
    return time.perf_counter() - started, summary


def _series(workdir: Path, tracks: int, layer: str) -> dict[str, Any]:
    """Fill a dataset of ``tracks``, export it whole, unchanged, and after one track changed."""
    from mess_ai.store.reader import open_store

    audio, store, out = (workdir / f"export-{tracks}" / name for name in ("audio", "store", "out"))
    fill_dataset(audio, store, DATASET, tracks, OVERHEAD_PROBE, overhead_probe)
    _distinct_features(store)
    whole, first = _export(store, out, layer)
    again, unchanged = _export(store, out, layer)
    changed_id = open_store(store, DATASET).track_ids[tracks // 2]
    _change_one_track(store, changed_id)
    after_change, changed = _export(store, out, layer)
    if unchanged.written or len(changed.written) != 1 or first.tracks != tracks:
        raise RuntimeError(f"export of {tracks} tracks: {len(unchanged.written)} parts rewritten unchanged, "
                           f"{len(changed.written)} after one track changed, {first.tracks} tracks exported")
    return {"tracks": tracks, "layer": layer, "parts": len(first.written), "whole_s": whole,
            "unchanged_s": again, "one_changed_s": after_change, "bytes": folder_bytes(out, "*.parquet"),
            "rows_windows": first.windows}


def run(workdir: Path, quick: bool) -> dict[str, Any]:
    result = new_result(NAME, quick)
    big, small = (300, 100) if quick else (20_000, 2_000)
    series = [_series(workdir, big, "mean"), _series(workdir, small, "all")]
    for s in series:
        label = f"{s['tracks']:,} tracks, layer {s['layer']}"
        add_figure(result, f"{label}: whole export", s["whole_s"], "s")
        add_figure(result, f"{label}: tracks exported per second", s["tracks"] / s["whole_s"], "tracks/s")
        add_figure(result, f"{label}: Parquet written", s["bytes"] / 1e6, "MB")
        add_figure(result, f"{label}: export again, nothing changed", s["unchanged_s"], "s")
        add_figure(result, f"{label}: export again after one track changed (1 of {s['parts']} parts rewritten)",
                   s["one_changed_s"], "s")
    mean = series[0]
    add_target(result, "re-export after one changed track rewrites only its part and costs a fraction of a whole "
                       "export", f"{mean['one_changed_s']:.1f} s vs {mean['whole_s']:.1f} s (1 of {mean['parts']} "
                       "parts)", mean["one_changed_s"] < 0.25 * mean["whole_s"],
               "the unchanged parts are recognised from the index (content keys of their tracks) and left as they "
               "are; the manifest is read and every part's key computed each time")
    result["notes"] = [
        "Datasets filled as for dataset-size: one track extracted by the pipeline (2 s of audio: one window), the "
        "others copies of its row under their own ids, with MERT-v1-95M's shapes (the overhead probe as model); "
        "every track's features then replaced by random float32 values of its own (Parquet compresses identical "
        "vectors to nothing). Every track has one window; a real dataset has one per 2.5 s of audio, and its "
        "windows table grows with that.",
        "The changed track: its row's sha256 replaced and its feature files rewritten, as a re-extraction after its "
        "file changed leaves them.",
    ]
    result["details"] = {"series": series}
    return result

