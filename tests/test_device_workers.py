"""Model workers, one per GPU of a host, shown on stand-in GPUs (``$MESS_AI_STAND_IN_GPUS``: each is the CPU under a
name of its own): each chunk's model work runs on a free device and says which, two devices work at once, and two
runs on one host never have model work on the same device at the same moment, whatever their slots say."""

from __future__ import annotations

import threading
from collections import defaultdict
from pathlib import Path
from typing import Iterator

import pytest

from mess_ai.config import ExtractConfig
from mess_ai.features.device import STAND_IN_GPUS_ENV
from mess_ai.features.extractor import TrackJob
from mess_ai.pipeline import ExtractionSession, run_extraction
from mess_ai.reporting import summary_table
from tests.helpers.audio import write_audio
from tests.helpers.flows import extract_flow

DEVICES = ["stand-in:0", "stand-in:1"]


@pytest.fixture
def two_gpus(lock_dir, monkeypatch) -> None:
    """Two stand-in GPUs, their host-wide locks this test's own (``lock_dir``)."""
    monkeypatch.setenv(STAND_IN_GPUS_ENV, "2")


def prepared(tmp_path: Path, name: str, model: str, files: int = 4) -> tuple[ExtractionSession, list[TrackJob]]:
    """A session on a store of its own (a run) over ``files`` new files, decoded and ready for the model."""
    audio = tmp_path / name
    for i in range(files):
        write_audio(audio / f"{name}{i}.wav", seconds=2.0, frequency=300 + 40 * i, seed=i)
    session = ExtractionSession(tmp_path / f"store-{name}", name, ExtractConfig(model=model, device="cuda"))
    return session, list(session.preprocess(session.validate(session.plan(session.discover(audio)))))


def held_open(jobs: list[TrackJob], together: threading.Barrier, patience: float) -> Iterator[TrackJob]:
    """``jobs`` as a decoder hands them over, pausing after the first until ``together`` is full (or ``patience``
    seconds have passed): the model work consuming them is then in progress. Model work that cannot run at once
    waits past the pause."""
    yield jobs[0]
    try:
        together.wait(timeout=patience)
    except threading.BrokenBarrierError:
        pass
    yield from jobs[1:]


def extract_at_once(chunks: list[tuple[ExtractionSession, list[TrackJob]]], patience: float) -> None:
    """Each chunk's model work in a thread of its own, as the flow's chunks run, all trying to be in model work at
    once for up to ``patience`` seconds."""
    together = threading.Barrier(len(chunks))
    threads = [threading.Thread(target=session.extract, args=(held_open(jobs, together, patience),))
               for session, jobs in chunks]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)


def overlaps(intervals: list[tuple[float, float, str]]) -> list[tuple]:
    """Pairs of intervals on the same device that overlap in time."""
    by_device = defaultdict(list)
    for start, end, device in intervals:
        by_device[device].append((start, end))
    return [(device, a, b) for device, spans in by_device.items()
            for a, b in zip(sorted(spans), sorted(spans)[1:]) if a[1] > b[0]]


def test_two_chunks_run_on_two_devices_at_once_and_each_file_says_which(tmp_path, tiny_model, two_gpus):
    session, jobs = prepared(tmp_path, "a", tiny_model)
    assert session.devices == DEVICES
    try:
        extract_at_once([(session, jobs[:2]), (session, jobs[2:])], patience=10.0)  # at once, unless broken
        summary = session.summary(tmp_path / "a", 1.0, [])
    finally:
        session.close()
    assert summary.done == 4
    spans = {}  # each device's model work, from its first turn to its last
    for start, end, device in summary.model_work:
        first, last = spans.get(device, (start, end))
        spans[device] = (min(first, start), max(last, end))
    assert set(spans) == set(DEVICES)
    (start1, end1), (start2, end2) = spans.values()
    assert max(start1, start2) < min(end1, end2)  # the two devices' model work overlapped
    by_file = {o.relative_path: o.device for o in summary.outcomes}
    assert by_file["a0.wav"] == by_file["a1.wav"] != by_file["a2.wav"] == by_file["a3.wav"]
    assert summary.files_by_device == {"stand-in:0": 2, "stand-in:1": 2}
    measures = {row["measure"]: row["value"] for row in summary_table(summary)}
    assert measures["files per device (model work)"] == "stand-in:0: 2 files, stand-in:1: 2 files"


def test_a_plain_python_run_spreads_its_files_over_every_device(tmp_path, tiny_model, two_gpus):
    audio = tmp_path / "audio"
    for i in range(4):
        write_audio(audio / f"t{i}.wav", seconds=2.0, frequency=300 + 40 * i, seed=i)
    summary = run_extraction(audio, tmp_path / "store", config=ExtractConfig(model=tiny_model, device="cuda"))
    assert summary.done == 4 and summary.files_by_device == {"stand-in:0": 2, "stand-in:1": 2}


def test_works_one_after_the_other_take_turns_on_the_devices(tmp_path, tiny_model, two_gpus):
    """A work that begins after another has ended takes the device fewer works have begun on (a plain run's
    second stream may start after its first has finished: its files still go to the other device)."""
    session, jobs = prepared(tmp_path, "a", tiny_model, files=6)
    try:
        for part in (jobs[:2], jobs[2:4], jobs[4:]):
            session.extract(part)
        summary = session.summary(tmp_path / "a", 1.0, [])
    finally:
        session.close()
    by_file = {o.relative_path: o.device for o in summary.outcomes}
    assert [by_file[f"a{i}.wav"] for i in range(6)] == ["stand-in:0"] * 2 + ["stand-in:1"] * 2 + ["stand-in:0"] * 2


def test_two_runs_on_one_host_never_share_a_device_even_without_slots(tmp_path, tiny_model, two_gpus):
    """No concurrency limit at all (as when a limit's slot count is wrong): the devices' host-wide locks alone keep
    four chunks of two runs, all trying to run at once, to one chunk per device at a time."""
    runs = [prepared(tmp_path, name, tiny_model) for name in ("a", "b")]
    try:
        extract_at_once([(session, part) for session, jobs in runs for part in (jobs[:2], jobs[2:])], patience=1.0)
        summaries = [session.summary(tmp_path, 1.0, []) for session, _ in runs]
    finally:
        for session, _ in runs:
            session.close()
    intervals = [work for summary in summaries for work in summary.model_work]
    assert [s.done for s in summaries] == [4, 4] and len(intervals) >= 4
    assert {device for _, _, device in intervals} == set(DEVICES)
    assert overlaps(intervals) == []


def test_two_flow_runs_with_two_slots_never_have_model_work_on_one_device_at_once(tmp_path, tiny_model, two_gpus,
                                                                                   prefect_api):
    """Two runs on a host of two (stand-in) GPUs and a limit of two slots: each file's model work on one of them,
    never two chunks on one device at the same moment (how the runs share the slots is the API's doing)."""
    results = {}

    def run(name: str) -> None:
        audio = tmp_path / name
        for i in range(3):
            write_audio(audio / f"{name}{i}.wav", seconds=2.0, frequency=200 + 40 * i, seed=i)
        results[name] = extract_flow(audio_dir=str(audio), store=str(tmp_path / "store"), model=tiny_model,
                                     device="cuda", files_per_task=1, gpu_limit="gpu-two-stand-ins", gpu_slots=2,
                                     retry_delay_seconds=0)

    threads = [threading.Thread(target=run, args=(name,)) for name in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    assert [results[name]["done"] for name in ("a", "b")] == [3, 3]
    intervals = [tuple(work) for result in results.values() for work in result["model_work"]]
    assert len(intervals) == 6 and {device for _, _, device in intervals} <= set(DEVICES)
    assert overlaps(intervals) == []
    devices = [o["device"] for result in results.values() for o in result["outcomes"]]
    assert len(devices) == 6 and set(devices) <= set(DEVICES)


def test_a_run_of_several_devices_cuts_enough_chunks_to_keep_each_device_fed():
    from flows.extract import balanced_files_per_chunk

    # Four devices, five chunks in flight: 20 files make five chunks of four, not two of ten (two idle GPUs).
    assert balanced_files_per_chunk(20, 16, in_flight=5) == 4
    assert balanced_files_per_chunk(3, 16, in_flight=5) == 1
    assert balanced_files_per_chunk(20, 16) == 10  # one device: as before
