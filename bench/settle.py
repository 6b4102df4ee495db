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

Then, feeding the device: the model stage (``ExtractionSession.extract``) over short clips decoded beforehand, with a
stand-in device that runs a batch in the time MERT-v1-95M would take on one H100 in bf16 (the issue's estimate,
2,500x real time: a sleep, which leaves the CPU free as a GPU's work does) and answers the overhead probe's zeros.
Side by side: the tracks a batch finishes written on the model's thread (as before) and behind it, by a thread of
their own (``ModelStage.write_behind``). The device's busy share is its time over the model stage's wall time.
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
DEVICE_SPEED = 2500.0  # x real time: MERT-v1-95M in bf16 on one H100, the estimate
FEED_CLIPS, QUICK_FEED_CLIPS = 320, 32
FEED_BATCH = 16


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


def _stand_in_device() -> Any:
    """The overhead probe (MERT-v1-95M's shapes, zeros), each batch also taking the time MERT-v1-95M would take on
    the GPU (``DEVICE_SPEED``: a sleep, which leaves the CPU free as a GPU's work does); ``busy``: those times."""
    import dataclasses

    from bench.probe import OverheadProbeModel, overhead_probe

    @dataclasses.dataclass(frozen=True)
    class StandInDevice(OverheadProbeModel):
        busy: list = dataclasses.field(default_factory=list)

        def hidden_states(self, input_values: Any) -> Any:
            seconds = input_values.shape[0] * input_values.shape[1] / self.sampling_rate / DEVICE_SPEED
            time.sleep(seconds)
            self.busy.append(seconds)
            return super().hidden_states(input_values)

    probe = overhead_probe()
    return StandInDevice(**{f.name: getattr(probe, f.name) for f in dataclasses.fields(OverheadProbeModel)})


def _clips(workdir: Path, clips: int, sample_rate: int, channels: int) -> Path:
    """``clips`` WAV files of 5 s (one window each), written once per workdir."""
    from tests.helpers.audio import write_audio

    audio = workdir / NAME / f"clips-{clips}-{sample_rate}-{channels}"
    if not audio.exists():
        for index in range(clips):
            write_audio(audio / f"clip{index:04d}.wav", seconds=5.0, sample_rate=sample_rate, channels=channels,
                        frequency=150 + index)
    return audio


def _config() -> Any:
    from bench.probe import OVERHEAD_PROBE, PROBE_REVISION
    from mess_ai.config import ExtractConfig

    return ExtractConfig(model=OVERHEAD_PROBE, revision=PROBE_REVISION, device="cpu", batch_size=FEED_BATCH)


def _feed(workdir: Path, clips: int, write_behind: bool, label: str) -> tuple[float, float]:
    """The model stage over ``clips`` decoded 5 s clips with the stand-in device: (wall seconds, device seconds)."""
    from mess_ai.extraction.model_stage import ModelStage
    from mess_ai.pipeline import ExtractionSession

    device = _stand_in_device()
    audio = _clips(workdir, clips, 24000, 1)
    session = ExtractionSession(workdir / NAME / "feed" / label, "clips", _config(),
                                model_loader=lambda *a, **k: device, decode_workers=0)
    try:
        jobs = list(session.preprocess(session.validate(session.plan(session.discover(audio)))))
        before, ModelStage.write_behind = ModelStage.write_behind, write_behind
        try:
            started = time.perf_counter()
            outcomes = session.extract(jobs)
            wall = time.perf_counter() - started
        finally:
            ModelStage.write_behind = before
    finally:
        session.close()
    if sum(o.status == "done" for o in outcomes) != clips:
        raise RuntimeError(f"{label}: {sum(o.status == 'done' for o in outcomes)} of {clips} clips done")
    return wall, sum(device.busy)


def _whole_run(workdir: Path, clips: int, workers: int, label: str) -> tuple[float, float, float]:
    """``run_extraction`` over ``clips`` 5 s clips as recorded (44.1 kHz stereo: decoded, downmixed, resampled)
    with the stand-in device and ``workers`` decode workers: (wall seconds, device seconds, audio seconds)."""
    from mess_ai.pipeline import run_extraction

    device = _stand_in_device()
    started = time.perf_counter()
    summary = run_extraction(_clips(workdir, clips, 44100, 2), workdir / NAME / "whole" / label, dataset="clips",
                             config=_config(), model_loader=lambda *a, **k: device, decode_workers=workers)
    wall = time.perf_counter() - started
    if summary.done != clips:
        raise RuntimeError(f"{label}: {summary.done} of {clips} clips done")
    return wall, sum(device.busy), summary.audio_seconds


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
    clips = QUICK_FEED_CLIPS if quick else FEED_CLIPS
    feed: dict[str, list[tuple[float, float]]] = {"inline": [], "behind": []}
    for attempt in range(-1, repeats):  # an untimed first pass, then both ways in turn
        for way in (["inline", "behind"] if attempt % 2 else ["behind", "inline"]):
            measured = _feed(workdir, clips, way == "behind", f"{attempt + 1}-{way}")
            if attempt >= 0:
                feed[way].append(measured)
    share = {}
    for way, words in (("inline", "written on the model's thread (as before)"),
                       ("behind", "written behind the model (now)")):
        wall = statistics.median(w for w, _ in feed[way])
        busy = statistics.median(b for _, b in feed[way])
        share[way] = busy / wall
        add_figure(result, f"feeding the device, {words}: model stage wall", wall, "s")
        add_figure(result, f"feeding the device, {words}: device busy share", share[way] * 100, "%")
    add_figure(result, "feeding the device: busy share behind / on the model's thread", share["behind"] / share["inline"],
               "ratio")
    whole: dict[int, list[tuple[float, float, float]]] = {0: [], 2: []}
    for attempt in range(repeats):
        for workers in (0, 2) if attempt % 2 == 0 else (2, 0):
            whole[workers].append(_whole_run(workdir, clips, workers, f"{attempt}-{workers}"))
    for workers, runs in whole.items():
        wall = statistics.median(w for w, _, _ in runs)
        add_figure(result, f"whole pipeline (decoding included), {workers} decode workers: device busy share",
                   statistics.median(b / w for w, b, _ in runs) * 100, "%")
        add_figure(result, f"whole pipeline (decoding included), {workers} decode workers: throughput",
                   statistics.median(a / w for w, _, a in runs), "audio s per s")
    sqlite = per_track["SQLite"]
    add_target(result, "tracks one batch finishes are recorded in one manifest write (issue 13: bulk writes)",
               f"SQLite {sqlite[ways[0][0]]:.2f} ms per track alone, {sqlite[ways[-1][0]]:.2f} ms in groups of 16",
               sqlite[ways[-1][0]] < sqlite[ways[0][0]],
               "per group: one transaction (done and claims) and one sync per feature folder; per track still its "
               "two files, each fsynced before its rename")
    add_target(result, "the device is not kept waiting by the writes (issue 13: a GPU that is never starved)",
               f"busy {share['behind'] * 100:.0f} % with the writes behind the model, {share['inline'] * 100:.0f} % "
               "with them on its thread", share["behind"] > share["inline"],
               f"{clips} clips of 5 s, batches of {FEED_BATCH}, the stand-in device at {DEVICE_SPEED:g}x real time; "
               "what keeps it from 100 %: the model's thread still pools each batch and hands tracks over, and the "
               "writes compete with it for this machine's 2 cores")
    result["notes"] += [
        f"{count} tracks per way, each taken and begun before the clock starts; median of {repeats} interleaved "
        "repeats (the ways' order turned by one each repeat, after one untimed pass), each into a new store (and a "
        "new PostgreSQL database).",
        "Timed: writing each track's segments [1, 13, 768] and aggregated [13, 768] float32 (atomic: temporary "
        "file, fsync, rename), the folder syncs, the manifest writes and the locks' release.",
        "PostgreSQL: a throwaway cluster on loopback (Debian's packages, as in the scale-out tests) with fsync on; "
        "over a network each transaction also pays a round trip.",
        f"Feeding the device: {clips} clips of 5 s (one window each) decoded beforehand (not timed), the model "
        f"stage timed from its call to its return (the last writes included), batches of {FEED_BATCH}; the device "
        f"is a STAND-IN (a sleep of the batch's audio seconds / {DEVICE_SPEED:g}), no GPU was used. Medians of "
        f"{repeats} runs of each way, in turn, after one untimed run.",
        f"Whole pipeline: run_extraction over {clips} clips of 5 s as recorded (44.1 kHz stereo 16-bit WAV, decoded, "
        "downmixed and resampled), the same stand-in device, with 0 and 2 decode workers: every track taken, its "
        "bytes hashed, its attempt recorded, decoded, through the device and written. On this 2-core machine the "
        "decoding side bounds it; the figures say how far from the device's speed a run of short clips is here.",
    ]
    result["details"] = {"tracks": count, "ms_per_track": per_track, "feed_clips": clips,
                         "feed_wall_and_busy_seconds": feed}
    return result
