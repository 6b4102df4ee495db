"""Decoding in processes of our own: the same samples and the same failure rows as decoding in the run's process,
a file changed under the worker detected, a worker killed or stuck failing its file only, and no worker left."""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import threading
import time

import numpy as np
import psutil
import pytest

from mess_ai.audio import AudioLimits, discover_audio, identity, load_mono
from mess_ai.audio.decode_pool import DecodePool, default_decode_workers
from mess_ai.audio.decode_worker import read_segment, sweep_segments, write_segment
from mess_ai.config import ExtractConfig
from mess_ai.deadline import StageTimeout, run_within
from mess_ai.extraction.decoding import budget_seconds
from mess_ai.extraction.track import UNFINISHED_BEFORE_GIVING_UP
from mess_ai.pipeline import ExtractionSession, run_extraction
from mess_ai.store import FeatureStore
from tests.helpers.audio import write_audio, write_nonfinite_wav, write_not_audio

WORKER_MODULE = "mess_ai.audio.decode_worker"


def decode_workers() -> list[psutil.Process]:
    """This process's decoding processes still alive."""
    return [child for child in psutil.Process().children(recursive=True)
            if child.is_running() and child.status() != psutil.STATUS_ZOMBIE and WORKER_MODULE in child.cmdline()]


def stopped_decoder() -> psutil.Process:
    """The one live decoding process, waited for (the pool starts it as it is made; until it has exec'd it shows
    this process's command line) and stopped (SIGSTOP): it answers nothing until it is killed, so a file handed
    to it is never decoded first."""
    deadline = time.monotonic() + 10
    while not (workers := decode_workers()) and time.monotonic() < deadline:
        time.sleep(0.01)
    [worker] = workers
    worker.send_signal(signal.SIGSTOP)
    return worker


def config(model: str) -> ExtractConfig:
    return ExtractConfig(model=model, device="cpu")


def rows(store, dataset: str = "audio") -> dict[str, dict]:
    fs = FeatureStore(store, dataset)
    try:
        return {r["relative_path"]: r for r in fs.manifest.rows(dataset)}
    finally:
        fs.close()


def segments(store, audio, dataset: str = "audio") -> dict[str, np.ndarray]:
    """The stored segments of each file of ``audio`` that has them, by relative path."""
    paths = {s.relative: store / dataset / "segments" / f"{s.track_id}.npy" for s in discover_audio(audio)}
    return {name: np.load(path, allow_pickle=False) for name, path in paths.items() if path.exists()}


def test_default_workers_keep_a_gpu_fed_and_leave_a_cpu_model_its_cores():
    assert default_decode_workers("cuda", gpus=1, cpus=16) == 4
    assert default_decode_workers("cuda", gpus=8, cpus=16) == 15  # the cores less one for the run itself
    assert default_decode_workers("cuda", gpus=1, cpus=2) == 1
    assert default_decode_workers("cuda", gpus=1, cpus=1) == 0  # in the run's own process
    assert default_decode_workers("mps", gpus=1, cpus=10) == 4
    assert default_decode_workers("cpu", gpus=0, cpus=64) == 0
    assert budget_seconds(0) == budget_seconds(1) == 600 and budget_seconds(4) == 2400


def test_a_worker_decodes_the_same_samples_as_load_mono_in_process(tmp_path):
    files = [write_audio(tmp_path / "cd.wav", seconds=3.0, sample_rate=44100, channels=2, seed=1),
             write_audio(tmp_path / "float.wav", seconds=2.0, sample_rate=48000, subtype="FLOAT", seed=2),
             write_audio(tmp_path / "native.flac", seconds=2.0, sample_rate=24000, seed=3)]
    with DecodePool(2) as pool:
        futures = [pool.decode(path, identity(os.stat(path)), 24000, AudioLimits()) for path in files]
        decoded = [future.result(timeout=30).samples for future in futures]
    for path, samples in zip(files, decoded):
        expected = load_mono(path, 24000)
        assert samples.dtype == np.float32 and np.array_equal(samples, expected), path.name
    assert not decode_workers()
    assert not [name for name in os.listdir("/dev/shm") if name.startswith(f"mess-ai-{os.getpid()}-")]



def test_shared_memory_left_by_a_dead_run_is_swept_and_a_live_runs_is_not():
    gone = psutil.Popen(["true"])
    gone.wait()
    samples = np.arange(8, dtype=np.float32)
    orphan, ours = write_segment(samples, gone.pid), write_segment(samples, os.getpid())
    try:
        assert sweep_segments() == [orphan.lstrip("/")]
        assert np.array_equal(read_segment(ours, len(samples)), samples)  # read (and unlinked) as a run does
    finally:
        for name in (orphan, ours):
            if os.path.exists(f"/dev/shm{name}"):
                os.unlink(f"/dev/shm{name}")

def test_runs_with_and_without_workers_give_the_same_features_and_the_same_failure_rows(tmp_path, tiny_model):
    audio = tmp_path / "audio"
    for i in range(3):
        write_audio(audio / f"t{i}.wav", seconds=2.0 + i, sample_rate=44100, channels=2, seed=i)
    write_nonfinite_wav(audio / "bad" / "nan.wav")  # the header passes, decoding fails
    truncated = write_audio(audio / "bad" / "truncated.flac", seconds=6.0, sample_rate=44100, seed=1)
    os.truncate(truncated, truncated.stat().st_size // 2)  # decoding fails half-way
    write_not_audio(audio / "bad" / "text.wav")  # fails at validation, before any decoding
    summaries = {workers: run_extraction(audio, tmp_path / f"store{workers}", dataset="audio",
                                         config=config(tiny_model), decode_workers=workers) for workers in (0, 2)}
    assert not decode_workers()

    assert summaries[0].done == summaries[2].done == 3
    here, there = segments(tmp_path / "store0", audio), segments(tmp_path / "store2", audio)
    assert set(here) == set(there) == {"t0.wav", "t1.wav", "t2.wav"}
    assert all(np.array_equal(here[name], there[name]) for name in here)

    def failure_rows(store):
        return {name: (r["status"], r["failure_stage"], r["error_class"], r["error_message"], r["permanent"])
                for name, r in rows(store).items() if r["status"] != "done"}

    in_process = failure_rows(tmp_path / "store0")
    assert set(in_process) == {"bad/nan.wav", "bad/truncated.flac", "bad/text.wav"}
    assert failure_rows(tmp_path / "store2") == in_process


def test_a_file_rewritten_between_the_hash_and_the_worker_is_decoded_as_recorded(tmp_path, tiny_model, monkeypatch,
                                                                                caplog):
    caplog.set_level(logging.INFO)
    audio = tmp_path / "audio"
    song = write_audio(audio / "song.wav", seconds=3.0, frequency=300)
    submit = ExtractionSession.submit

    def rewritten_first(session, open_track):  # hashed by the run; then rewritten in place, same size
        write_audio(song, seconds=3.0, frequency=900)
        return submit(session, open_track)

    monkeypatch.setattr(ExtractionSession, "submit", rewritten_first)
    summary = run_extraction(audio, tmp_path / "store", dataset="audio", config=config(tiny_model),
                             decode_workers=1)
    monkeypatch.undo()
    assert summary.done == 1
    assert "song.wav: it changed after it was hashed; decoding it in the run's own process." in caplog.text
    # The manifest's hash is of the bytes whose features are stored: those of the rewritten file.
    assert rows(tmp_path / "store")["song.wav"]["sha256"] == hashlib.sha256(song.read_bytes()).hexdigest()
    fresh = run_extraction(audio, tmp_path / "fresh", dataset="audio", config=config(tiny_model), decode_workers=0)
    assert fresh.done == 1
    assert np.array_equal(segments(tmp_path / "store", audio)["song.wav"],
                          segments(tmp_path / "fresh", audio)["song.wav"])


def test_a_worker_killed_while_decoding_fails_that_file_and_another_takes_over(tmp_path, tiny_model, monkeypatch):
    audio = tmp_path / "audio"
    for i in range(3):
        write_audio(audio / f"t{i}.wav", seconds=2.0, seed=i)
    write_audio(audio / "long.wav", seconds=30.0, sample_rate=44100, channels=2, seed=9)
    submit = ExtractionSession.submit
    killed: list[int] = []

    def kill_the_decoder_of_long(session, open_track):
        if open_track.track.source.relative != "long.wav":
            return submit(session, open_track)
        worker = stopped_decoder()
        future = submit(session, open_track)
        killed.append(worker.pid)
        worker.send_signal(signal.SIGKILL)  # as the kernel does to a process that takes too much memory
        return future

    monkeypatch.setattr(ExtractionSession, "submit", kill_the_decoder_of_long)
    session = ExtractionSession(tmp_path / "store", "audio", config(tiny_model), decode_workers=1)
    try:
        sources = session.validate(session.plan(session.discover(audio)))
        outcomes = session.extract(session.decode_ahead(sources))
        alive = decode_workers()
        assert len(alive) == 1 and alive[0].pid != killed[0]  # replaced
    finally:
        session.close()
    assert not decode_workers()
    assert sorted(o.relative_path for o in outcomes if o.status == "done") == ["t0.wav", "t1.wav", "t2.wav"]
    long = session.outcomes[next(s.track_id for s in sources if s.relative == "long.wav")]
    assert (long.status, long.stage, long.error_class, long.permanent) == (
        "failed", "preprocess", "DecodingProcessDied", False)
    assert long.reason == "the decoding process died (killed by signal 9, SIGKILL) while decoding it"
    assert rows(tmp_path / "store")["long.wav"]["error_message"] == long.reason


def test_a_file_its_decoding_process_dies_on_again_and_again_is_given_up_on(tmp_path, tiny_model, monkeypatch):
    audio = tmp_path / "audio"
    write_audio(audio / "poison.wav", seconds=2.0)
    submit = ExtractionSession.submit

    def killing(session, open_track):
        worker = stopped_decoder()
        future = submit(session, open_track)
        worker.send_signal(signal.SIGKILL)
        return future

    monkeypatch.setattr(ExtractionSession, "submit", killing)
    for attempt in range(1, UNFINISHED_BEFORE_GIVING_UP + 1):
        summary = run_extraction(audio, tmp_path / "store", dataset="audio", config=config(tiny_model),
                                 decode_workers=1)
        [outcome] = summary.failures
        assert (outcome.error_class, outcome.permanent, outcome.attempts) == ("DecodingProcessDied", False, attempt)
    summary = run_extraction(audio, tmp_path / "store", dataset="audio", config=config(tiny_model),
                             decode_workers=1)
    [outcome] = summary.failures
    assert outcome.permanent and f"ended {UNFINISHED_BEFORE_GIVING_UP} times" in outcome.reason
    assert not decode_workers()


def test_a_chunk_stuck_on_a_worker_times_out_and_closing_the_session_ends_the_worker(tmp_path, tiny_model):
    audio = tmp_path / "audio"
    write_audio(audio / "song.wav", seconds=2.0)
    session = ExtractionSession(tmp_path / "store", "audio", config(tiny_model), decode_workers=1)
    sources = session.validate(session.plan(session.discover(audio)))
    stream = session.decode_ahead([])  # starts the decoding process
    stopped_decoder()  # a decoder that never answers, as on a dead network mount
    try:
        with pytest.raises(StageTimeout) as caught:
            run_within(lambda: session.extract(session.decode_ahead(sources)), 1.0, "chunk 1 of 1",
                       session.activity)
        assert caught.value.doing == "decoding song.wav (in a decoding process)"
        assert caught.value.track_id == sources[0].track_id
        started = time.monotonic()
    finally:
        session.close()
    assert time.monotonic() - started < 8
    assert not decode_workers()
    assert not [t for t in threading.enumerate() if t.name.startswith(("mess-ai-decode", "mess-ai-chunk"))
                and t.is_alive()]
    stream.close()
