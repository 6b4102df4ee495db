"""dataset-size: the cost of a run does not grow with the tracks already done.

Side by side in one run: (a) the flow adding 40 new files to a dataset of 20,000 done tracks and to an empty one
(interleaved, medians), target <= 1.2x; (b) a no-op flow run over 100,000 done tracks whose files are present,
target <= 10 s, the model never loaded. The model is the overhead probe (bench/probe.py): zero model cost, so what
is measured is the pipeline's own work per file and per run.

Filling 100,000 done tracks through the pipeline would take hours, so a dataset is filled from one real run: the
pipeline extracts one small WAV (its provenance, dataset record, manifest row and features are what a run writes),
then every other track is a hard link to that WAV under its own path (its own track id), with a copy of the real
row (its own track id and paths) inserted in bulk and hard links to the real track's feature files.
"""

from __future__ import annotations

import os
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

from bench.common import add_figure, add_target, audio_set, flow_model_loader, new_result, run_flow, warm_up_flow
from bench.probe import OVERHEAD_PROBE, PROBE_REVISION, overhead_probe, refuse_model
from tests.helpers.audio import write_tone_in_blocks

NAME = "dataset-size"
RATIO_TARGET = 1.2
NOOP_TARGET_SECONDS = 10.0
LINKS_PER_FOLDER = 1000
# Hard links per file (ext4 allows 65,000): each group of links points to its own copy of the file.
LINKS_PER_INODE = 10_000


def fill_dataset(audio_dir: Path, store: Path, dataset: str, tracks: int) -> None:
    """``tracks`` done tracks in ``dataset``: one extracted by the pipeline, the others copies of it (see the
    module's docstring). The audio lies in folders of ``LINKS_PER_FOLDER`` files under ``audio_dir/filled``."""
    from sqlalchemy import insert

    from mess_ai.audio import discover_audio
    from mess_ai.config import ExtractConfig
    from mess_ai.extraction.plan import file_identity
    from mess_ai.pipeline import run_extraction
    from mess_ai.store import SCALES, FeatureStore
    from mess_ai.store.manifest import tracks as tracks_table

    seed = audio_dir / "filled" / "f000" / "t000000.wav"
    write_tone_in_blocks(seed, 2.0, 24000, 1)
    config = ExtractConfig(model=OVERHEAD_PROBE, revision=PROBE_REVISION, device="cpu")
    first = run_extraction(audio_dir, store, dataset=dataset, config=config, model_loader=overhead_probe)
    if first.done != 1:
        raise RuntimeError(f"filling {dataset}: the seed track was not extracted ({first.outcomes})")
    group: dict[str, int] = {}  # relative path -> its group of links: one file (the seed or a copy), its links
    heads: list[Path] = []
    for index in range(tracks):
        relative = f"filled/f{index // LINKS_PER_FOLDER:03d}/t{index:06d}.wav"
        path = audio_dir / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        if index % LINKS_PER_INODE == 0:
            if index:
                shutil.copy2(seed, path)  # the same bytes and mtime, another inode
            heads.append(path)
        else:
            os.link(heads[-1], path)
        group[relative] = len(heads) - 1
    # Stated after the links: each link changed its inode's ctime, which the file identity holds.
    identities = [file_identity(head.stat()) for head in heads]
    sources = discover_audio(audio_dir)
    store_ = FeatureStore(store, dataset)
    try:
        seed_source = next(s for s in sources if s.path == seed)
        row = store_.manifest.get(dataset, seed_source.track_id)
        head_ids: dict[int, str] = {0: seed_source.track_id}
        rows = []
        for source in sources:
            number = group[source.relative]
            rows.append({**row, "track_id": source.track_id, "source_path": str(source.path),
                         "relative_path": source.relative, "file_identity": identities[number]})
            if source is seed_source:
                continue
            features = [scale for scale in SCALES if store_.path(scale, seed_source.track_id).exists()]
            if number not in head_ids:  # the group's own copy of the seed's features
                head_ids[number] = source.track_id
                for scale in features:
                    shutil.copy2(store_.path(scale, seed_source.track_id), store_.path(scale, source.track_id))
            else:
                for scale in features:
                    os.link(store_.path(scale, head_ids[number]), store_.path(scale, source.track_id))
        store_.manifest.forget(dataset, seed_source.track_id)
        with store_.manifest.engine.begin() as conn:
            conn.execute(insert(tracks_table), rows)
    finally:
        store_.close()


def forget(store: Path, dataset: str, track_ids: list[str]) -> None:
    """Take ``track_ids`` out of the dataset again (rows and features): the next run finds them new."""
    from mess_ai.store import FeatureStore

    store_ = FeatureStore(store, dataset)
    try:
        for track_id in track_ids:
            store_.manifest.forget(dataset, track_id)
            store_.remove_outputs(track_id)
    finally:
        store_.close()


def add_new_files(workdir: Path, store: Path, dataset: str, audio_dir: Path) -> tuple[float, dict[str, Any]]:
    """One flow run over ``audio_dir``: its wall seconds and summary; the new files it extracted are forgotten
    afterwards, so the next run finds them new again."""
    started = time.perf_counter()
    with flow_model_loader(overhead_probe):
        summary = run_flow(audio_dir, store, OVERHEAD_PROBE, dataset=dataset)
    wall = time.perf_counter() - started
    done = [o["track_id"] for o in summary["outcomes"] if o["status"] == "done"]
    forget(store, dataset, done)
    return wall, summary


def run(workdir: Path, quick: bool) -> dict[str, Any]:
    result = new_result(NAME, quick)
    big, new_files, new_seconds, noop_tracks, repeats = (
        (200, 4, 2.0, 500, 1) if quick else (20_000, 40, 10.0, 100_000, 4))
    warm_up_flow(workdir)

    # (a) new files into a big dataset and into an empty one: the same files, hard-linked into both folders.
    new = audio_set(workdir, new_files, new_seconds)
    big_audio, empty_audio = workdir / "size" / "big", workdir / "size" / "empty"
    stores = {"big": workdir / "size" / "big-store", "empty": workdir / "size" / "empty-store"}
    started = time.perf_counter()
    fill_dataset(big_audio, stores["big"], "big", big)
    fill_seconds = time.perf_counter() - started
    for folder in (big_audio, empty_audio):
        (folder / "new").mkdir(parents=True, exist_ok=True)
        for path in sorted(new.glob("*.wav")):
            os.link(path, folder / "new" / path.name)
    folders = {"big": big_audio, "empty": empty_audio}
    walls: dict[str, list[float]] = {"big": [], "empty": []}
    details: dict[str, Any] = {}
    for label in ("empty", "big"):  # untimed: first-run costs (the empty store's creation) out of the figures
        add_new_files(workdir, stores[label], label, folders[label])
    for _ in range(repeats):
        for label in ("empty", "big"):
            wall, summary = add_new_files(workdir, stores[label], label, folders[label])
            if summary["done"] != new_files:
                raise RuntimeError(f"adding {new_files} files to the {label} dataset extracted {summary['done']}")
            walls[label].append(wall)
            details.setdefault(f"{label}_stage_seconds", []).append(summary["stage_seconds"])
    big_wall, empty_wall = statistics.median(walls["big"]), statistics.median(walls["empty"])
    ratio = big_wall / empty_wall

    # (b) a no-op run over many done tracks.
    noop_audio, noop_store = workdir / "size" / "noop", workdir / "size" / "noop-store"
    started = time.perf_counter()
    fill_dataset(noop_audio, noop_store, "noop", noop_tracks)
    fill_seconds += time.perf_counter() - started
    started = time.perf_counter()
    with flow_model_loader(refuse_model):
        noop = run_flow(noop_audio, noop_store, OVERHEAD_PROBE, dataset="noop")
    noop_wall = time.perf_counter() - started
    if noop["unchanged"] != noop_tracks or noop["model_loaded"]:
        raise RuntimeError(f"the no-op run found {noop['unchanged']} of {noop_tracks} tracks unchanged (model "
                           f"loaded: {noop['model_loaded']})")

    add_figure(result, f"adding {new_files} new files to an empty dataset (flow)", empty_wall, "s")
    add_figure(result, f"adding {new_files} new files to a dataset of {big:,} done tracks (flow)", big_wall, "s")
    add_figure(result, f"ratio, {big:,} done tracks / empty", ratio, "x")
    add_figure(result, f"no-op flow run over {noop_tracks:,} done tracks", noop_wall, "s")
    add_figure(result, "  of which discover + plan", noop["stage_seconds"]["discover"], "s")
    add_figure(result, "  of which the integrity check", noop["stage_seconds"]["integrity"], "s")
    add_figure(result, "model loaded by the no-op run", int(noop["model_loaded"]), "times")
    add_target(result, f"adding new files to {big:,} done tracks <= {RATIO_TARGET}x the time for an empty dataset",
               f"{ratio:.2f}x ({big_wall:.1f} s vs {empty_wall:.1f} s)", ratio <= RATIO_TARGET,
               "per-file and per-chunk manifest reads by key, the run's integrity check on the tracks it wrote")
    add_target(result, f"no-op flow run over {noop_tracks:,} done tracks <= {NOOP_TARGET_SECONDS:.0f} s",
               f"{noop_wall:.1f} s", noop_wall <= NOOP_TARGET_SECONDS,
               "one listing, one manifest read, a size check of each track's outputs, no per-file artifact rows")
    add_target(result, "the no-op run never loads the model", "never loaded", not noop["model_loaded"])
    result["notes"] += [
        f"Model: the overhead probe (zero model cost). New files: {new_files} WAV files of {new_seconds:g} s "
        f"(44.1 kHz stereo); each dataset got one untimed run first, then {repeats} timed runs each, interleaved "
        "(empty, big, empty, big, ...); medians. After each run the new tracks are forgotten (rows and features) "
        "so that the next run finds them new again.",
        "Filled datasets: one track extracted by the pipeline from a 2 s WAV (24 kHz mono), every other track a "
        "hard link to that WAV under its own path and track id (folders of 1,000), with a copy of the real "
        "manifest row (bulk insert) and hard links to the real feature files. All links share one inode, so "
        "their file identity (inode and ctime) is the same, as the plan expects of an unchanged file; the disk "
        "holds one WAV and one track's features.",
        f"Filling took {fill_seconds:.0f} s (not timed in the figures); Prefect's API start and a warm-up flow run "
        "are not timed either.",
        "The whole flow run is timed, from the call to its return: Prefect's own costs included.",
    ]
    result["details"] = {"walls": walls, "noop_stage_seconds": noop["stage_seconds"], "fill_seconds": fill_seconds,
                         **details}
    return result
