"""The logic of the Prefect tasks, called through ``task.fn()``: no flow run, no Prefect server.

Real audio files, the tiny checkpoint and a real store with its SQLite manifest; what each test checks is what the
task adds over the ``ExtractionSession`` stage it wraps (its time limit, what it returns or raises, its retry rule).
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from pathlib import Path

import pytest
from prefect import flow
from prefect.client.schemas.objects import FlowRun
from prefect.context import FlowRunContext
from prefect.filesystems import LocalFileSystem
from prefect.logging import disable_run_logger
from prefect.results import ResultStore
from prefect.states import Completed, Failed, exception_to_failed_state

import mess_ai.extraction.steps
import mess_ai.pipeline
import tasks.extraction
import tasks.notify
from mess_ai.config import ExtractConfig
from mess_ai.deadline import StageTimeout, TimeLimits
from mess_ai.errors import InputError, MessError, ModelError, StoreError, TrackBusyError
from mess_ai.pipeline import ExtractionSession, FileOutcome, RunSummary, run_extraction
from mess_ai.store.manifest import MANIFEST_URL_ENV
from tasks.extraction import (
    GpuSlot,
    TransientFileErrors,
    check_integrity,
    discover_files,
    is_transient,
    process_chunk,
    validate_files,
)
from tasks.manifest import manifest_url_of_run
from tasks.notify import COMPLETED, FAILED, FILES_FAILED, RUN_HOOKS, announce_outcome, failed_files_text
from tests.helpers.audio import write_audio, write_nonfinite_wav, write_not_audio


# How long a call made to hang waits at most: a stage whose time limit broke ends its test, failed, not never.
STUCK_SECONDS = 30


@pytest.fixture(autouse=True)
def no_run_logger():
    """The tasks call ``get_run_logger()``; outside a run it raises, unless the run loggers are disabled."""
    with disable_run_logger():
        yield


def open_session(tmp_path: Path, model: str) -> ExtractionSession:
    return ExtractionSession(tmp_path / "store", "audio", ExtractConfig(model=model, device="cpu"))


@pytest.fixture
def session(tmp_path, tiny_model):
    session = open_session(tmp_path, tiny_model)
    yield session
    session.close()


def planned(session: ExtractionSession, audio: Path) -> list:
    """The valid new or changed files of ``audio``, as the flow hands them to its chunks."""
    return validate_files.fn(session, discover_files.fn(session, str(audio), only_failed=False))


def names(items) -> list[str]:
    return sorted(getattr(item, "relative", None) or item.relative_path for item in items)


def released(event: threading.Event, what: str) -> None:
    """Let a stage stuck on ``event`` go, and wait for its abandoned thread (it still writes to the store)."""
    event.set()
    for thread in threading.enumerate():
        if thread.name == f"mess-ai-{what}"[:60]:
            thread.join(30)


# --- discover-files ----------------------------------------------------------------------------------------------

def test_discover_files_returns_new_and_changed_files_and_counts_the_unchanged(tmp_path, tiny_model):
    audio = tmp_path / "audio"
    for i, name in enumerate(("a.wav", "b.wav", "c.wav")):
        write_audio(audio / name, seconds=2.0, frequency=300 + 50 * i)
    run_extraction(audio, tmp_path / "store", dataset="audio", config=ExtractConfig(model=tiny_model, device="cpu"))
    write_audio(audio / "b.wav", seconds=2.0, frequency=900)  # changed bytes
    write_audio(audio / "d.wav", seconds=2.0, frequency=700)  # new

    session = open_session(tmp_path, tiny_model)
    try:
        assert names(discover_files.fn(session, str(audio), only_failed=False)) == ["b.wav", "d.wav"]
        counts = session.counts()
        assert (counts.discovered, counts.unchanged, counts.left) == (4, 2, 2)
    finally:
        session.close()

    session = open_session(tmp_path, tiny_model)
    try:
        pending = discover_files.fn(session, str(audio), only_failed=False, files=["a.wav", "d.wav"])
        assert names(pending) == ["d.wav"]  # a.wav is named but unchanged; b.wav is changed but not named
        counts = session.counts()
        assert (counts.unchanged, counts.not_selected, counts.left) == (1, 2, 1)
    finally:
        session.close()


def test_discover_files_past_its_time_limit_raises_stage_timeout(tmp_path, session, monkeypatch):
    write_audio(tmp_path / "audio" / "a.wav", seconds=2.0)
    never = threading.Event()
    discover_audio = mess_ai.pipeline.discover_audio

    def stuck(root):  # listing blocks, as on a network mount that stopped answering (bounded: a test ends)
        never.wait(STUCK_SECONDS)
        return discover_audio(root)

    monkeypatch.setattr(mess_ai.pipeline, "discover_audio", stuck)
    started = time.monotonic()
    try:
        with pytest.raises(StageTimeout) as caught:
            discover_files.fn(session, str(tmp_path / "audio"), only_failed=False,
                              limits=TimeLimits(base_seconds=0.5, seconds_per_file=0))
        took = time.monotonic() - started
    finally:
        released(never, "listing the audio folder")
    assert (caught.value.what, caught.value.seconds) == ("listing the audio folder", 0.5)
    assert caught.value.doing == f"listing {tmp_path / 'audio'}"  # set in the watched thread
    assert took < 5


# --- validate-files ----------------------------------------------------------------------------------------------

def test_validate_files_drops_the_files_that_are_not_usable_audio(tmp_path, session):
    audio = tmp_path / "audio"
    write_audio(audio / "good.wav", seconds=2.0)
    write_not_audio(audio / "text.wav")
    write_audio(audio / "short.wav", seconds=0.4)  # under the 1 s minimum
    pending = discover_files.fn(session, str(audio), only_failed=False)
    assert names(pending) == ["good.wav", "short.wav", "text.wav"]

    assert names(validate_files.fn(session, pending)) == ["good.wav"]
    failed = {o.relative_path: o for o in session.outcomes.values() if o.status == "failed"}
    assert sorted(failed) == ["short.wav", "text.wav"]
    assert all(o.stage == "validate" and o.permanent for o in failed.values())
    rows = {r["relative_path"]: r["status"] for r in session.store.manifest.rows("audio")}
    assert rows == {"short.wav": "failed", "text.wav": "failed"}  # good.wav is not touched before its chunk


# --- process-chunk -----------------------------------------------------------------------------------------------

def test_process_chunk_returns_the_outcomes_of_its_files(tmp_path, session):
    audio = tmp_path / "audio"
    write_audio(audio / "a.wav", seconds=3.0)
    write_audio(audio / "b.wav", seconds=2.0, frequency=300)
    write_nonfinite_wav(audio / "nan.wav")  # a header that passes, samples that do not: fails for good
    sources = planned(session, audio)
    assert names(sources) == ["a.wav", "b.wav", "nan.wav"]

    outcomes = process_chunk.fn(session, sources, GpuSlot(None), index=0, total=1)
    assert {o.relative_path: o.status for o in outcomes} == {"a.wav": "done", "b.wav": "done"}
    assert [o.duration_seconds for o in sorted(outcomes, key=lambda o: o.relative_path)] == [3.0, 2.0]
    assert {o.device for o in outcomes} == {"cpu"}  # where their model work ran
    nan = next(o for o in session.outcomes.values() if o.relative_path == "nan.wav")
    assert (nan.status, nan.stage, nan.permanent) == ("failed", "preprocess", True)  # recorded, not raised
    rows = {r["relative_path"]: r["status"] for r in session.store.manifest.rows("audio")}
    assert rows == {"a.wav": "done", "b.wav": "done", "nan.wav": "failed"}


def test_a_transient_failure_raises_and_a_retry_redoes_only_the_files_not_settled(tmp_path, session, monkeypatch):
    audio = tmp_path / "audio"
    write_audio(audio / "flaky.wav", seconds=2.0)
    write_audio(audio / "steady.wav", seconds=2.0, frequency=300)
    sources = planned(session, audio)
    load_mono = mess_ai.extraction.steps.load_mono
    loads = {"flaky.wav": 0, "steady.wav": 0}

    def flaky_load(opened, rate, **kwargs):  # the first read of flaky.wav hits an I/O error
        loads[opened.path.name] += 1
        if opened.path.name == "flaky.wav" and loads["flaky.wav"] == 1:
            raise OSError(5, "Input/output error (injected)")
        return load_mono(opened, rate, **kwargs)

    monkeypatch.setattr(mess_ai.extraction.steps, "load_mono", flaky_load)
    with pytest.raises(TransientFileErrors) as caught:
        process_chunk.fn(session, sources, GpuSlot(None), index=0, total=1)
    assert [(o.relative_path, o.stage, o.permanent) for o in caught.value.outcomes] == [
        ("flaky.wav", "preprocess", False)]
    assert "flaky.wav (preprocess: [Errno 5] Input/output error (injected))" in str(caught.value)
    assert loads == {"flaky.wav": 1, "steady.wav": 1}

    # Prefect's retry calls the task again with the same files: only flaky.wav is read again.
    outcomes = process_chunk.fn(session, sources, GpuSlot(None), index=0, total=1)
    assert [(o.relative_path, o.status, o.attempts) for o in outcomes] == [("flaky.wav", "done", 2)]
    assert loads == {"flaky.wav": 2, "steady.wav": 1}
    assert process_chunk.fn(session, sources, GpuSlot(None), index=0, total=1) == []  # nothing left
    assert loads == {"flaky.wav": 2, "steady.wav": 1}
    # What the run reports: both extracted now (a file settled by an earlier try is not seen again as unchanged).
    assert {o.relative_path: o.status for o in session.outcomes.values()} == {"flaky.wav": "done",
                                                                              "steady.wav": "done"}


def test_a_chunk_past_its_time_limit_raises_stage_timeout_naming_what_it_was_stuck_on(tmp_path, session,
                                                                                      monkeypatch):
    audio = tmp_path / "audio"
    write_audio(audio / "a.wav", seconds=2.0)
    write_audio(audio / "b.wav", seconds=2.0, frequency=300)
    sources = planned(session, audio)  # loads the model: the limit below is the chunk's work only
    never = threading.Event()
    load_mono = mess_ai.extraction.steps.load_mono

    def stuck_on_b(opened, *args, **kwargs):  # reading b.wav blocks, as on a dead network mount
        if opened.path.name == "b.wav":
            never.wait(STUCK_SECONDS)
        return load_mono(opened, *args, **kwargs)

    monkeypatch.setattr(mess_ai.extraction.steps, "load_mono", stuck_on_b)
    started = time.monotonic()
    try:
        with pytest.raises(StageTimeout) as caught:
            process_chunk.fn(session, sources, GpuSlot(None), index=1, total=3, seconds=2.0)
        took = time.monotonic() - started
    finally:
        released(never, "chunk 2 of 3")
    b = next(s for s in sources if s.relative == "b.wav")
    timeout = caught.value
    assert (timeout.what, timeout.doing, timeout.track_id, timeout.stage) == (
        "chunk 2 of 3", "reading and decoding b.wav", b.track_id, "preprocess")
    assert str(timeout) == ("chunk 2 of 3 did not finish within its time limit of 2 s "
                            "(stuck reading and decoding b.wav)")
    assert took < 10


# --- check-integrity ---------------------------------------------------------------------------------------------

def test_check_integrity_lists_a_damaged_feature_file_of_the_run(tmp_path, tiny_model):
    audio = tmp_path / "audio"
    write_audio(audio / "a.wav", seconds=2.0)
    run_extraction(audio, tmp_path / "store", dataset="audio", config=ExtractConfig(model=tiny_model, device="cpu"))
    write_audio(audio / "b.wav", seconds=2.0, frequency=300)
    session = open_session(tmp_path, tiny_model)
    try:
        process_chunk.fn(session, planned(session, audio), GpuSlot(None), index=0, total=1)
        assert check_integrity.fn(session) == []

        rows = {r["relative_path"]: r["track_id"] for r in session.store.manifest.rows("audio")}
        for name in ("a.wav", "b.wav"):
            damaged = session.store.path("segments", rows[name])
            with open(damaged, "r+b") as npy:
                npy.truncate(damaged.stat().st_size // 2)
        problems = check_integrity.fn(session)
    finally:
        session.close()
    # b.wav is this run's; a.wav, done before, is `mess-ai check`'s.
    assert len(problems) == 1 and str(session.store.path("segments", rows["b.wav"])) in problems[0]


# --- the retry rule ----------------------------------------------------------------------------------------------

class OutOfMemoryError(RuntimeError):
    """Named as ``torch.cuda.OutOfMemoryError`` is (torch is not needed to test the rule)."""


def transient_errors() -> TransientFileErrors:
    return TransientFileErrors([FileOutcome("t1", "a.wav", "failed", "preprocess", "OSError", "I/O error",
                                            permanent=False)])


@pytest.mark.parametrize(("error", "retried"), [
    (transient_errors(), True),
    (OSError(5, "Input/output error"), True),
    (TrackBusyError("another run holds track t1"), True),
    (OutOfMemoryError("CUDA out of memory"), True),
    (InputError("a.wav", "not audio", "validate"), False),
    (MessError("the model produced non-finite values"), False),
    (ModelError("no such checkpoint"), False),
    (StoreError("the manifest cannot be written"), False),
    (StageTimeout("chunk 1 of 2", 10.0, "reading a.wav"), False),  # the stuck work still holds its files
    (ValueError("a bug"), False),
])
def test_only_transient_trouble_is_retried(error, retried, tmp_path):
    # The state Prefect's task engine hands a retry condition (the exception itself as its data) ...
    assert is_transient(process_chunk, None, Failed(data=error)) is retried
    # ... and a failed state whose data is a result record of the exception (a local store: no API needed).
    store = ResultStore(result_storage=LocalFileSystem(basepath=str(tmp_path)))
    state = asyncio.run(exception_to_failed_state(error, result_store=store))
    assert not isinstance(state.data, BaseException)
    assert is_transient(process_chunk, None, state) is retried


# --- the run's outcome event (tasks/notify.py) -------------------------------------------------------------------

@pytest.fixture
def events(monkeypatch) -> list[tuple[str, dict]]:
    """The events the run hooks emit, as (event, payload): Prefect's event transport needs an API."""
    emitted: list[tuple[str, dict]] = []
    monkeypatch.setattr(tasks.notify, "emit_event",
                        lambda event, resource, related, payload: emitted.append((event, payload)))
    monkeypatch.setattr(tasks.notify, "REPEAT_SECONDS", 0.0)
    return emitted


@flow(name="extract-audio")
def a_flow() -> None:
    """Only its name is used: the hooks are called as Prefect calls them, with the flow and its run."""


def a_run(deployed: bool) -> FlowRun:
    return FlowRun(id=uuid.uuid4(), name="brave-fox", flow_id=uuid.uuid4(),
                   deployment_id=uuid.uuid4() if deployed else None)


def summary_with(*statuses: str) -> RunSummary:
    outcomes = [FileOutcome(f"t{i}", f"f{i}.wav", status, "preprocess", "AudioError", "not audio")
                for i, status in enumerate(statuses)]
    return RunSummary("/audio", "/store", "audio", discovered=len(statuses), outcomes=outcomes)


def test_failed_files_text_names_five_files_and_counts_the_rest():
    text = failed_files_text(summary_with(*["failed"] * 7, "done"))
    assert text.startswith("f0.wav (preprocess: not audio); f1.wav (preprocess: not audio)")
    assert "f4.wav" in text and "f5.wav" not in text
    assert text.endswith("; and 2 more")


def announce_in(run: FlowRun, summary: RunSummary) -> None:
    # The two fields announce_outcome reads of the run's context (a whole one needs an API client).
    with FlowRunContext.model_construct(flow=a_flow, flow_run=run):
        announce_outcome(summary)


def test_a_run_where_files_failed_says_so_and_its_completion_hook_says_it_again(events):
    run = a_run(deployed=True)
    announce_in(run, summary_with("failed", "done", "previously_failed"))
    assert [event for event, _ in events] == [FILES_FAILED]
    payload = events[0][1]
    assert (payload["failed"], payload["found"], payload["dataset"]) == (1, 3, "audio")
    assert payload["text"] == ("mess-ai: flow run brave-fox (extract-audio) completed, but files failed in it: "
                               "1 of 3 files failed in dataset audio: f0.wav (preprocess: not audio)")

    on_completion = RUN_HOOKS["on_completion"][0]
    on_completion(a_flow, run, Completed())
    assert [event for event, _ in events] == [FILES_FAILED, FILES_FAILED]  # not "completed"
    assert events[1][1] == payload
    on_completion(a_flow, run, Completed())  # said once: a later call is a run without an announcement
    assert [event for event, _ in events] == [FILES_FAILED, FILES_FAILED, COMPLETED]


def test_a_run_without_new_failures_completes_and_its_hook_adds_nothing(events):
    run = a_run(deployed=True)
    announce_in(run, summary_with("done", "previously_failed", "unchanged"))  # failed before: not this run's news
    RUN_HOOKS["on_completion"][0](a_flow, run, Completed())
    assert [event for event, _ in events] == [COMPLETED]
    assert events[0][1]["text"] == "mess-ai: flow run brave-fox (extract-audio) completed"


def test_announcing_outside_a_flow_run_emits_nothing(events):
    announce_outcome(summary_with("failed"))
    assert events == []


def test_a_failed_deployment_run_is_said_twice_and_a_cli_run_once(events, monkeypatch, caplog):
    on_failure = RUN_HOOKS["on_failure"][0]
    on_failure(a_flow, a_run(deployed=True), Failed(message="chunk 1 of 2 did not finish"))
    on_failure(a_flow, a_run(deployed=False), Failed(message="chunk 1 of 2 did not finish"))
    assert [event for event, _ in events] == [FAILED, FAILED, FAILED]
    assert events[0][1]["text"] == "mess-ai: flow run brave-fox (extract-audio) FAILED: chunk 1 of 2 did not finish"

    def unreachable(**kwargs):
        raise ConnectionError("the API is away")

    monkeypatch.setattr(tasks.notify, "emit_event", unreachable)
    on_failure(a_flow, a_run(deployed=True), Failed())  # a hook never turns the outcome into another
    assert "Could not emit mess-ai.run.failed for flow run brave-fox" in caplog.text


# --- the manifest URL of a run (tasks/manifest.py) ---------------------------------------------------------------

def test_the_manifest_url_of_a_run_without_a_secret(monkeypatch):
    monkeypatch.setenv(MANIFEST_URL_ENV, "postgresql+psycopg://mess_ai:pw@env-host/mess_ai")
    assert manifest_url_of_run("sqlite:////srv/store/manifest.sqlite", None) == "sqlite:////srv/store/manifest.sqlite"
    assert manifest_url_of_run(None, None) == "postgresql+psycopg://mess_ai:pw@env-host/mess_ai"
    with pytest.raises(ValueError, match="carries a password"):
        manifest_url_of_run("postgresql+psycopg://mess_ai:pw@db-host/mess_ai", None)
    monkeypatch.delenv(MANIFEST_URL_ENV)
    assert manifest_url_of_run(None, None) is None  # the store's own SQLite file
