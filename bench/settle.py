"""settle: what recording a finished track costs, one track at a time against the tracks of one batch together.

A batch of the model finishes several short files at once (up to the batch size: 4 on a CPU, 16 on a GPU). Each
finished track's features are written (two files, fsynced and renamed), then it is recorded done in the manifest and
its claim deleted. Side by side in one run, on the SQLite manifest of a store and on a PostgreSQL manifest (a
throwaway cluster on loopback, durability on, when Debian's PostgreSQL and psycopg are here):

- as before batches were settled together: per track, its files with a folder sync after each rename, then two
  manifest transactions (``mark_done``, then the claim's release);
- settled together in groups of 1, 4 and 16 tracks (``settle_done``): per track its files, then per group one sync
  of each feature folder and one transaction marking the group done and deleting its claims.

The model is not involved: every track is taken, begun (its bytes hashed, its attempt recorded) and given segments
of one 5 s window of MERT-v1-95M's shape [1, 13, 768] before the clock starts; what is timed is what the model
stage does after a batch, for every track of the set.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from bench.common import add_figure, add_target, new_result

NAME = "settle"
TRACKS, QUICK_TRACKS = 480, 48
REPEATS = 3
GROUPS = (1, 4, 16)
STATES, HIDDEN = 13, 768


@contextlib.contextmanager
def _manifests(workdir: Path) -> Iterator[list[tuple[str, str | None]]]:
    """(label, manifest URL) for SQLite (None: the store's own file) and, where possible, PostgreSQL."""
    from tests.helpers.postgres import postgres_server, unavailable_reason

    found: list[tuple[str, str | None]] = [("SQLite", None)]
    why = unavailable_reason()
    if why is not None:
        found.append((f"PostgreSQL: not measured ({why})", ""))
        yield found
        return
    with postgres_server(durable=True) as server:
        found.append(("PostgreSQL", server))
        yield found


def _tracks(store: Any, sources: list, key: str) -> list:
    """Every source taken and begun, as the decoding does, with one window's segments ready to write."""
    from mess_ai.audio.opening import open_audio
    from mess_ai.extraction.track import TrackAttempt
    from mess_ai.features.extractor import TrackJob

    jobs = []
    for index, source in enumerate(sources):
        track = TrackAttempt.take(store, source, key)
        with open_audio(source.path) as opened:
            error = track.begin(opened)
        if error is not None:
            raise RuntimeError(f"{source.relative}: {error}")
        track.duration_seconds, track.n_samples = 5.0, 120_000
        job = TrackJob(source.track_id, np.zeros(0, np.float32), [(0, 120_000)], context=track,
                       segments=np.full((1, STATES, HIDDEN), index, np.float32), windows_done=1)
        jobs.append(job)
    return jobs


def _settle_as_before(store: Any, jobs: list) -> None:
    """Each track alone, as the model stage did before: files (a folder sync after each rename), ``mark_done``,
    then the lock's release (the claim deleted in a transaction of its own)."""
    from mess_ai.audio.loading import DECODER_REVISION
    from mess_ai.extraction.steps import write_features

    for job in jobs:
        track = job.context
        write_features(store, job)
        track._settled = True
        store.manifest.mark_done(store.dataset, job.track_id, duration_seconds=track.duration_seconds,
                                 n_windows=1, seconds_spent=0.0, n_samples=track.n_samples,
                                 decoder_revision=DECODER_REVISION)
        track.give_back()


def _settle_grouped(store: Any, jobs: list, group: int) -> None:
    """As the model stage does now, ``group`` tracks finished by one batch at a time."""
    from mess_ai.extraction.steps import write_features
    from mess_ai.extraction.track import settle_done

    for start in range(0, len(jobs), group):
        part = jobs[start:start + group]
        for job in part:
            write_features(store, job, sync_dirs=False)
        store.sync_feature_dirs()
        settle_done([(job.context, 1) for job in part])


def run(workdir: Path, quick: bool) -> dict[str, Any]:
    from mess_ai.audio import discover_audio
    from mess_ai.store import DONE, FeatureStore
    from tests.helpers.audio import write_audio

    result = new_result(NAME, quick)
    count = QUICK_TRACKS if quick else TRACKS
    repeats = 1 if quick else REPEATS
    audio = workdir / NAME / "audio"
    for index in range(count):  # tiny files: only their bytes are read (hashed), never decoded
        write_audio(audio / f"clip{index:04d}.wav", seconds=0.05, sample_rate=8000, frequency=200 + index)
    sources = discover_audio(audio)
    ways = [("as before: each track alone, 2 transactions", None)] + [
        (f"settled together in groups of {group}", group) for group in GROUPS]
    per_track: dict[str, dict[str, float]] = {}
    with _manifests(workdir) as manifests:
        for label, target in manifests:
            if target == "":
                result["notes"].append(label)
                continue
            walls: dict[str, list[float]] = {way: [] for way, _ in ways}
            # An untimed first pass (the first store, the first connections), then every way in each repeat, in
            # an order turned by one each time.
            for attempt in range(-1, repeats):
                turned = ways[attempt % len(ways):] + ways[:attempt % len(ways)]
                for way, group in turned if attempt >= 0 else ways[-1:]:
                    name = f"{attempt + 1}-{group or 'before'}"
                    url = target.create_database(f"settle_{attempt + 1}_{group or 0}") if target else None
                    store = FeatureStore(workdir / NAME / "stores" / label / name, "clips", manifest_url=url)
                    try:
                        jobs = _tracks(store, sources[:16] if attempt < 0 else sources, "bench-key")
                        started = time.perf_counter()
                        if group is None:
                            _settle_as_before(store, jobs)
                        else:
                            _settle_grouped(store, jobs, group)
                        if attempt < 0:
                            continue
                        walls[way].append(time.perf_counter() - started)
                        done = store.manifest.rows(store.dataset, DONE)
                        if len(done) != count:
                            raise RuntimeError(f"{way}: {len(done)} of {count} tracks recorded done")
                    finally:
                        store.close()
            per_track[label] = {way: statistics.median(values) / count * 1000 for way, values in walls.items()}
            for way, _ in ways:
                add_figure(result, f"{label}: {way}", per_track[label][way], "ms per track")
            before, batch16 = per_track[label][ways[0][0]], per_track[label][ways[-1][0]]
            add_figure(result, f"{label}: as before / groups of 16 (a GPU batch)", before / batch16, "ratio")
    sqlite = per_track["SQLite"]
    add_target(result, "tracks one batch finishes are recorded in one manifest write (issue 13: bulk writes)",
               f"SQLite {sqlite[ways[0][0]]:.2f} ms per track alone, {sqlite[ways[-1][0]]:.2f} ms in groups of 16",
               sqlite[ways[-1][0]] < sqlite[ways[0][0]],
               "per group: one transaction (done and claims) and one sync per feature folder; per track still its "
               "two files, each fsynced before its rename")
    result["notes"] += [
        f"{count} tracks per way, each taken and begun before the clock starts; median of {repeats} interleaved "
        "repeats (the ways' order turned by one each repeat, after one untimed pass), each into a new store (and a "
        "new PostgreSQL database).",
        "Timed: writing each track's segments [1, 13, 768] and aggregated [13, 768] float32 (atomic: temporary "
        "file, fsync, rename), the folder syncs, the manifest writes and the locks' release.",
        "PostgreSQL: a throwaway cluster on loopback (Debian's packages, as in the scale-out tests) with fsync on; "
        "over a network each transaction also pays a round trip.",
    ]
    result["details"] = {"tracks": count, "ms_per_track": per_track}
    return result
