"""Time limits: a read that blocks or a model call that never returns ends the run, Failed, in bounded time; the
file it was stuck on is recorded with the reason, and the GPU slot is given back."""

from __future__ import annotations

import os
import re
import threading
import time

import pytest

from mess_ai.deadline import Activity, Deadline, StageTimeout, TimeLimits, run_within
from mess_ai.store import FeatureStore
from tests.helpers.audio import write_audio
from tests.helpers.flows import extract_flow


def unblock_fifo(path) -> None:
    """Let a reader stuck opening ``path`` go (it then reads end-of-file)."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
    except OSError:
        pass  # nobody is waiting on it any more


def test_run_within_returns_the_result_or_the_error():
    assert run_within(lambda: 42, 5, "answer") == 42
    with pytest.raises(ZeroDivisionError):
        run_within(lambda: 1 / 0, 5, "division")
    with pytest.raises(ValueError, match="positive"):
        run_within(lambda: 1, 0, "nothing")


def test_a_call_stuck_in_c_code_times_out_naming_what_it_was_doing(tmp_path):
    fifo = tmp_path / "pipe.wav"
    os.mkfifo(fifo)
    activity = Activity()

    def read():
        activity.set(f"reading {fifo.name}", "pipe", "preprocess")
        with open(fifo, "rb") as stream:  # blocks in open(2) until a writer comes: no bytecode runs meanwhile
            return stream.read()

    started = time.monotonic()
    try:
        with pytest.raises(StageTimeout) as caught:
            run_within(read, 0.5, "chunk 1 of 1", activity)
        assert time.monotonic() - started < 5
        assert (caught.value.doing, caught.value.track_id, caught.value.stage) == ("reading pipe.wav", "pipe",
                                                                                   "preprocess")
        assert str(caught.value) == "chunk 1 of 1 did not finish within its time limit of 0 s (stuck reading pipe.wav)"
    finally:
        unblock_fifo(fifo)


def test_time_limits_are_derived_from_the_work():
    limits = TimeLimits(base_seconds=100, seconds_per_audio_second=2, seconds_per_file=1)
    assert limits.chunk(audio_seconds=3600, files=10) == 100 + 7200 + 10
    assert limits.stage(files=50) == 150
    assert limits.run([10.0, 20.0], files=50) == 3 * 150 + 30
    assert TimeLimits(chunk_seconds=7).chunk(3600, 10) == 7
    assert TimeLimits(run_seconds=60).run([1e6], 10) == 60
    with pytest.raises(ValueError, match="base_seconds"):
        TimeLimits(base_seconds=0)
    clock = iter([0.0, 4.0, 11.0])
    deadline = Deadline(10, clock=lambda: next(clock))
    assert deadline.remaining() == 6 and deadline.passed()
    assert Deadline(10, elapsed=3, clock=lambda: 0.0).remaining() == 7


@pytest.mark.usefixtures("prefect_api")
def test_a_file_whose_read_blocks_fails_the_run_in_bounded_time_and_frees_the_gpu_slot(tmp_path, tiny_model,
                                                                                       monkeypatch):
    from prefect.client.orchestration import get_client

    import mess_ai.extraction.steps

    audio = tmp_path / "audio"
    for name in ("a.wav", "b.wav", "c.wav", "d.wav"):
        write_audio(audio / name, seconds=3.0)
    # Reading b.wav blocks in C code and never returns, as a read from a network mount that stopped answering
    # does (a FIFO no longer can: files are opened non-blocking, and a FIFO fails at once).
    never = threading.Event()
    load_mono = mess_ai.extraction.steps.load_mono

    def stuck_on_b(opened, *args, **kwargs):
        if opened.path.name == "b.wav":
            never.wait()
        return load_mono(opened, *args, **kwargs)

    monkeypatch.setattr(mess_ai.extraction.steps, "load_mono", stuck_on_b)
    limit = "gpu-time-limit-test"
    started = time.monotonic()
    try:
        state = extract_flow(audio_dir=str(audio), store=str(tmp_path / "store"), model=tiny_model,
                            device="cpu", files_per_task=2, gpu_limit=limit, chunk_time_limit_seconds=6,
                            return_state=True)
        took = time.monotonic() - started
        fs = FeatureStore(tmp_path / "store", "audio")
        try:
            rows = {r["relative_path"]: r for r in fs.manifest.rows_by_track("audio").values()}
        finally:
            fs.close()
    finally:
        never.set()  # (its thread then goes on: read the manifest before)
    assert state.is_failed()
    assert "chunk 1 of 2 did not finish within its time limit of 6 s" in state.message
    assert "b.wav" in state.message
    assert took < 60
    assert rows["b.wav"]["status"] == "failed" and rows["b.wav"]["error_class"] == "StageTimeout"
    assert "stuck reading and decoding b.wav for 6 s" in rows["b.wav"]["error_message"]
    assert not rows["b.wav"]["permanent"]  # retried on the next runs (given up after 3 time-outs)
    assert rows["c.wav"]["status"] == "done" and rows["d.wav"]["status"] == "done"  # the other chunk finished
    with get_client(sync_client=True) as client:
        assert client.read_global_concurrency_limit_by_name(limit).active_slots == 0


@pytest.mark.usefixtures("prefect_api")
def test_a_model_call_that_never_returns_fails_the_run_and_frees_the_gpu_slot(tmp_path, tiny_model, monkeypatch):
    from prefect.client.orchestration import get_client

    import mess_ai.features.extractor

    audio = tmp_path / "audio"
    write_audio(audio / "a.wav", seconds=3.0)  # one chunk: which of two would reach the model first is a race
    never = threading.Event()
    # A forward pass that never returns (a wedged GPU driver call): the thread waits in C, uninterruptible.
    monkeypatch.setattr(mess_ai.features.extractor.Extractor, "_forward", lambda self, windows: never.wait())
    limit = "gpu-time-limit-model-test"
    try:
        state = extract_flow(audio_dir=str(audio), store=str(tmp_path / "store"), model=tiny_model,
                            device="cpu", files_per_task=1, gpu_limit=limit, chunk_time_limit_seconds=6,
                            return_state=True)
        with get_client(sync_client=True) as client:
            active = client.read_global_concurrency_limit_by_name(limit).active_slots
        fs = FeatureStore(tmp_path / "store", "audio")
        try:
            statuses = {r["relative_path"]: r["status"] for r in fs.manifest.rows_by_track("audio").values()}
        finally:
            fs.close()
    finally:
        never.set()
    assert state.is_failed()
    assert "chunk 1 of 1 did not finish within its time limit of 6 s (stuck running the model on a.wav)" in \
        state.message
    assert active == 0
    # The model is stuck, not the file: it is not blamed, but left for the next run.
    assert statuses == {"a.wav": "pending"}


@pytest.mark.usefixtures("prefect_api")
def test_a_write_that_never_returns_behind_the_model_fails_the_run_naming_its_file(tmp_path, tiny_model,
                                                                                  monkeypatch):
    audio = tmp_path / "audio"
    write_audio(audio / "a.wav", seconds=3.0)
    never = threading.Event()
    real = FeatureStore.write_segments

    def wedged(self, track_id, *args, **kwargs):  # a store on a disk that stopped answering
        never.wait()
        return real(self, track_id, *args, **kwargs)

    monkeypatch.setattr(FeatureStore, "write_segments", wedged)
    try:
        state = extract_flow(audio_dir=str(audio), store=str(tmp_path / "store"), model=tiny_model,
                            device="cpu", files_per_task=1, gpu_limit="", chunk_time_limit_seconds=6,
                            return_state=True)
        fs = FeatureStore(tmp_path / "store", "audio")
        try:
            (row,) = fs.manifest.rows_by_track("audio").values()  # read while the write is still stuck
        finally:
            fs.close()
    finally:
        never.set()  # the disk answers again: the stuck writer may finish the track after all
    assert state.is_failed()
    # the model's thread waits for the writer behind it, and says what the writer is stuck on
    assert ("chunk 1 of 1 did not finish within its time limit of 6 s (stuck waiting for the writes behind the "
            "model (writing the features of a.wav))") in state.message, state.message
    assert (row["status"], row["failure_stage"]) == ("failed", "write")  # the file it was stuck on, recorded


@pytest.mark.usefixtures("prefect_api")
def test_a_run_past_its_own_time_limit_starts_no_more_chunks(tmp_path, tiny_model):

    audio = tmp_path / "audio"
    for i in range(4):
        write_audio(audio / f"t{i}.wav", seconds=2.0)
    state = extract_flow(audio_dir=str(audio), store=str(tmp_path / "store"), model=tiny_model, device="cpu",
                        files_per_task=1, gpu_limit="", run_time_limit_hours=0.1 / 3600, return_state=True)
    assert state.is_failed()
    # How many chunks started before the limit passed depends on this machine's speed; none after it did.
    found = re.search(r"the run did not finish within its time limit of 0 s \(stuck with (\d) of 4 chunks not "
                      r"started\)", state.message)
    assert found, state.message
    not_started = int(found.group(1))
    assert 1 <= not_started <= 4
    fs = FeatureStore(tmp_path / "store", "audio")
    try:
        statuses = sorted(r["status"] for r in fs.manifest.rows_by_track("audio").values())
    finally:
        fs.close()
    assert statuses == ["done"] * (4 - not_started)  # chunks in flight finished; the rest is left for the next run


def test_the_gpu_slot_waits_for_an_api_that_is_away_instead_of_failing_the_run():
    """A server restart while a run starts: taking the slot is tried again (until SLOT_RETRY_SECONDS), not given
    up at the first connection refused (which failed a soak night in an 8 s server restart)."""
    from prefect.settings import PREFECT_API_URL, PREFECT_CLIENT_MAX_RETRIES, temporary_settings

    from tasks.extraction import GpuSlot
    from tests.helpers.prefect_server import free_port

    with temporary_settings({PREFECT_API_URL: f"http://127.0.0.1:{free_port()}/api", PREFECT_CLIENT_MAX_RETRIES: 0}):
        slot = GpuSlot("gpu-api-away")
        slot.take()
        holder, = slot._holders
        deadline = time.monotonic() + 30
        while holder.failed_attempts < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert holder.failed_attempts >= 2  # refused, then tried again
        assert not holder.settled.is_set() and holder.error is None  # still waiting for the API, not failed
        slot.release()
        holder.join(10)
        assert not holder.is_alive() and not holder.held
