"""The new-audio watcher: the stability state machine on a fake clock, then real watchfiles on a real folder."""

from __future__ import annotations

import argparse
import hashlib
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from watchfiles import Change

import cli.watch
import deployments.watch
from deployments.watch import describe_batch, watch
from mess_ai.audio import discover_audio
from mess_ai.errors import MessError
from mess_ai.config import ExtractConfig
from mess_ai.pipeline import run_extraction
from mess_ai.store import FeatureStore
from mess_ai.watcher import StableBatcher, watch_folder
from tests.helpers.audio import write_audio

STABLE, DEBOUNCE = 1.0, 0.5


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def root(tmp_path):
    folder = tmp_path / "incoming"
    folder.mkdir()
    return folder


def batcher_for(root, clock, stable=STABLE, debounce=DEBOUNCE) -> StableBatcher:
    return StableBatcher(root, stable_seconds=stable, debounce_seconds=debounce, clock=clock)


def append(path, data: bytes) -> None:
    with open(path, "ab") as f:
        f.write(data)


def test_file_still_being_copied_is_not_reported(root, clock):
    batcher = batcher_for(root, clock)
    song = root / "song.wav"
    append(song, b"RIFF" + bytes(1000))
    batcher.feed({(Change.added, str(song))})
    assert batcher.poll() == []
    for _ in range(4):  # a copy that goes on for 4 s, with an event per write
        clock.advance(0.9)
        append(song, bytes(1000))
        batcher.feed({(Change.modified, str(song))})
        assert batcher.poll() == []
    clock.advance(0.9)
    append(song, bytes(1000))  # a write whose event has not come yet: the size change alone holds it back
    assert batcher.poll() == []
    clock.advance(0.9)
    assert batcher.poll() == [] and batcher.waiting == ["song.wav"]
    clock.advance(0.2)
    assert batcher.poll() == ["song.wav"]
    assert batcher.poll() == [] and batcher.waiting == []


def test_burst_of_files_becomes_one_batch(root, clock):
    batcher = batcher_for(root, clock, stable=0.5, debounce=2.0)
    for i in range(3):
        write_audio(root / f"take{i}.wav", seconds=0.1)
        batcher.feed({(Change.added, str(root / f"take{i}.wav"))})
        clock.advance(0.3)
        assert batcher.poll() == []
    # A folder moved in from elsewhere: one event for the folder, none for its files.
    staging = root.parent / "staging" / "session"
    write_audio(staging / "a.flac", seconds=0.1)
    write_audio(staging / "deeper" / "b.wav", seconds=0.1)
    shutil.move(str(staging), str(root / "session"))
    batcher.feed({(Change.added, str(root / "session"))})
    clock.advance(1.9)  # every file stable for a while, but the burst ended less than 2 s ago
    assert batcher.poll() == []
    clock.advance(0.1)
    assert batcher.poll() == ["session/a.flac", "session/deeper/b.wav", "take0.wav", "take1.wav", "take2.wav"]
    clock.advance(10)
    assert batcher.poll() == []


def test_replaced_file_is_reported_again_an_untouched_one_is_not(root, clock):
    batcher = batcher_for(root, clock)
    song = write_audio(root / "song.wav", seconds=0.2)
    batcher.feed({(Change.added, str(song))})
    clock.advance(STABLE)
    assert batcher.poll() == ["song.wav"]

    batcher.feed({(Change.modified, str(song))})  # an event without new bytes (attributes, a reopen)
    batcher.rescan()
    clock.advance(STABLE)
    assert batcher.poll() == []

    new_take = write_audio(root.parent / "new_take.wav", seconds=0.4)
    os.replace(new_take, song)  # how most tools replace a file: write elsewhere, rename over
    batcher.feed({(Change.deleted, str(song)), (Change.added, str(song))})
    clock.advance(STABLE)
    assert batcher.poll() == ["song.wav"]

    append(song, bytes(10))  # changed without any event reaching us: a rescan finds it
    os.utime(song, ns=(time.time_ns(), time.time_ns() + 10**9))
    batcher.rescan()
    clock.advance(STABLE)
    assert batcher.poll() == ["song.wav"]


def test_deleted_and_vanishing_files_are_dropped_without_error(root, clock):
    batcher = batcher_for(root, clock)
    keep = write_audio(root / "keep.wav", seconds=0.1)
    gone = write_audio(root / "gone.wav", seconds=0.1)
    vanishing = write_audio(root / "vanishing.wav", seconds=0.1)
    folder = root / "album"
    write_audio(folder / "t1.wav", seconds=0.1)
    batcher.feed({(Change.added, str(p)) for p in (keep, gone, vanishing, folder / "t1.wav")})
    batcher.feed({(Change.added, str(root / "never_there.wav")), (Change.modified, str(root / "nor_this.flac"))})
    gone.unlink()
    batcher.feed({(Change.deleted, str(gone))})
    vanishing.unlink()  # deleted between two checks, its event not delivered yet
    shutil.rmtree(folder)
    batcher.feed({(Change.deleted, str(folder))})
    clock.advance(STABLE)
    assert batcher.poll() == ["keep.wav"]
    assert batcher.dropped == {"deleted": 2, "vanished": 1}
    batcher.feed({(Change.deleted, str(vanishing)), (Change.deleted, str(keep))})
    keep.unlink()
    clock.advance(STABLE)
    assert batcher.poll() == []


def test_only_audio_files_by_the_discovery_rules_count(tmp_path, root, clock):
    outside = tmp_path / "outside"
    write_audio(outside / "secret.wav", seconds=0.1)
    write_audio(outside / "dir" / "elsewhere.wav", seconds=0.1)
    created = [
        write_audio(root / "keep.wav", seconds=0.1),
        write_audio(root / "LOUD.FLAC", seconds=0.1),
        write_audio(root / ".hidden.wav", seconds=0.1),
        write_audio(root / "._keep.wav", seconds=0.1),
        write_audio(root / ".cache" / "inside_hidden.wav", seconds=0.1),
    ]
    write_audio(root / "real" / "deep.wav", seconds=0.1)  # reported only through the alias below, as inotify can
    (root / "notes.txt").write_text("not audio")
    created.append(root / "notes.txt")
    os.symlink(outside / "secret.wav", root / "escape.wav")
    os.symlink(outside / "dir", root / "linked_out")
    os.symlink(root / "real", root / "alias")
    os.symlink(root / "keep.wav", root / "link_in.wav")
    events = {(Change.added, str(p)) for p in created}
    events |= {(Change.added, str(root / name)) for name in ("escape.wav", "linked_out", "link_in.wav")}
    events |= {(Change.added, str(root / "linked_out" / "elsewhere.wav")),
               (Change.added, str(root / "alias" / "deep.wav")), (Change.added, str(outside / "secret.wav"))}
    batcher = batcher_for(root, clock)
    batcher.feed(events)
    clock.advance(STABLE)
    expected = ["LOUD.FLAC", "keep.wav", "link_in.wav", "real/deep.wav"]
    assert [s.relative for s in discover_audio(root)] == expected
    assert batcher.poll() == expected


def test_files_there_at_start_are_told_apart_from_new_ones(root, clock):
    batcher = batcher_for(root, clock)
    write_audio(root / "old.wav", seconds=0.1)
    copying = write_audio(root / "copying.wav", seconds=0.1)
    arrived = write_audio(root / "arrived.wav", seconds=0.1)
    batcher.feed({(Change.added, str(arrived))})  # came between the watch's start and its first scan
    batcher.rescan(at_start=True)
    clock.advance(0.5)
    append(copying, bytes(100))  # still being copied when the watch began: it arrives, it is not old
    assert batcher.poll() == []
    clock.advance(STABLE)
    batch = batcher.poll()
    assert batch == ["arrived.wav", "copying.wav", "old.wav"]
    assert batcher.found_at_start(batch) == ["old.wav"]
    os.replace(write_audio(root.parent / "retake.wav", seconds=0.3), root / "old.wav")
    batcher.feed({(Change.added, str(root / "old.wav"))})
    clock.advance(STABLE)
    batch = batcher.poll()
    assert batch == ["old.wav"] and batcher.found_at_start(batch) == []


def test_bad_arguments_are_rejected(root):
    with pytest.raises(ValueError, match=r"stable_seconds \(-1\)"):
        StableBatcher(root, stable_seconds=-1)
    with pytest.raises(FileNotFoundError):
        watch_folder(root / "missing", lambda *_: None)
    with pytest.raises(ValueError, match="needs a store"):
        watch(root, local=True)


def test_watch_command_line():
    parser = argparse.ArgumentParser(prog="mess-ai")
    cli.watch.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["watch", "in", "--local", "--store", "st", "--stable-seconds", "2", "--model", "m"])
    assert args.func is cli.watch.cmd_watch
    assert (args.audio_dir, args.store, args.local, args.stable_seconds, args.debounce_seconds) == \
        (Path("in"), Path("st"), True, 2.0, 2.0)
    assert (args.model, args.device, args.deployment) == ("m", None, "extract-features/on-new-audio")


def test_describe_batch_names_at_most_three_files():
    assert describe_batch(["a.wav"]) == "1 new or changed recording is complete (a.wav)"
    assert describe_batch([f"{i}.wav" for i in range(5)]) == \
        "5 new or changed recordings are complete (0.wav, 1.wav, 2.wav and 2 more)"


def test_describe_batch_does_not_call_the_files_found_at_start_new():
    names = ["a.wav", "b.wav", "c.wav", "d.wav"]
    assert describe_batch(names, names) == ("Found 4 recordings in the folder at start (a.wav, b.wav, c.wav and "
                                            "1 more): one run picks up any that are new or changed")
    assert describe_batch(["a.wav", "new.wav"], ["a.wav"]) == (
        "Found 1 recording in the folder at start (a.wav) and 1 new or changed recording is complete (new.wav): "
        "one run picks up any that are new or changed")


# --- real watchfiles on a real folder ---------------------------------------------------------------------------


def copy_slowly(source, target, chunks: int, pause: float) -> None:
    """Copy ``source`` to ``target`` in ``chunks`` writes with ``pause`` seconds between them (a slow network copy)."""
    data = source.read_bytes()
    step = -(-len(data) // chunks)
    for start in range(0, len(data), step):
        append(target, data[start:start + step])
        time.sleep(pause)


def run_in_background(action, stop: threading.Event, done: threading.Event, linger: float, limit: float = 25.0):
    """Do ``action``, wait for ``done`` (then ``linger`` more seconds, to see that nothing else happens), then stop.

    The watch itself runs in the test's main thread, where the Prefect test API's settings are in effect.
    """

    def run() -> None:
        try:
            action()
            done.wait(limit)
            time.sleep(linger)
        finally:
            stop.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_watch_folder_reports_existing_files_then_each_change_once(tmp_path, root):
    write_audio(root / "before.wav", seconds=0.1)
    (tmp_path / "outside").mkdir()
    os.symlink(tmp_path / "outside", root / "linked_out")  # watchfiles follows it and reports what happens there
    batches: list[tuple[list[str], list[str]]] = []
    stop, done = threading.Event(), threading.Event()

    def on_batch(folder, relative_paths, found_at_start):
        batches.append((relative_paths, found_at_start))
        if len(batches) == 2:
            done.set()

    def act():
        time.sleep(1.5)
        write_audio(root / "sub" / "new.flac", seconds=0.1)
        write_audio(tmp_path / "outside" / "not_ours.wav", seconds=0.1)
        (root / "before.wav").unlink()

    thread = run_in_background(act, stop, done, linger=0.8)
    watch_folder(root, on_batch, stable_seconds=0.3, debounce_seconds=0.2, stop_event=stop)
    thread.join()
    assert batches == [(["before.wav"], ["before.wav"]), (["sub/new.flac"], [])]


def test_periodic_rescan_finds_what_no_event_announced(root):
    write_audio(root / "old.wav", seconds=0.1)
    batches: list[tuple[float, list[str]]] = []
    stop, done = threading.Event(), threading.Event()
    started = time.monotonic()

    def on_batch(folder, relative_paths, found_at_start):
        assert found_at_start == []  # no scan at start: old.wav is found by a periodic rescan
        batches.append((time.monotonic() - started, relative_paths))
        done.set()

    thread = run_in_background(lambda: None, stop, done, linger=0.3, limit=10)
    watch_folder(root, on_batch, stable_seconds=0.2, debounce_seconds=0.1, stop_event=stop, initial_scan=False,
                 rescan_seconds=1.0)
    thread.join()
    assert [b for _, b in batches] == [["old.wav"]] and batches[0][0] >= 1.0


@pytest.mark.usefixtures("prefect_api")
def test_slow_copy_gives_exactly_one_extraction_after_it_is_complete(tmp_path, root, tiny_model, monkeypatch):
    staged = write_audio(tmp_path / "staging" / "song.wav", seconds=2.0, frequency=330)
    full_size, full_sha = staged.stat().st_size, hashlib.sha256(staged.read_bytes()).hexdigest()
    starts: list[int] = []
    stop, done = threading.Event(), threading.Event()
    real_extract = deployments.watch._extract_here

    def extract_and_count(parameters, what):
        starts.append((root / "song.wav").stat().st_size)
        real_extract(parameters, what)
        done.set()

    monkeypatch.setattr(deployments.watch, "_extract_here", extract_and_count)
    thread = run_in_background(lambda: (time.sleep(0.5), copy_slowly(staged, root / "song.wav", 8, 0.4)),
                               stop, done, linger=2.0)
    started = time.monotonic()
    watch(root, store=tmp_path / "store", local=True, parameters={"model": tiny_model, "device": "cpu"},
          stable_seconds=1.2, debounce_seconds=0.5, stop_event=stop)
    thread.join()
    assert starts == [full_size]
    assert time.monotonic() - started >= 0.5 + 8 * 0.4
    store = FeatureStore(tmp_path / "store", "incoming")
    rows = store.manifest.rows("incoming")
    store.close()
    assert [(r["relative_path"], r["status"], r["sha256"], r["attempts"]) for r in rows] == \
        [("song.wav", "done", full_sha, 1)]


@pytest.mark.usefixtures("prefect_api")
def test_each_batch_starts_one_run_of_the_deployment(tmp_path, root, monkeypatch):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    from flows.extract import extract_features

    with pytest.raises(MessError, match="no deployment extract-features/nowhere"):
        watch(root, deployment="extract-features/nowhere")
    deployment_id = extract_features.to_deployment(name="watch-test").apply()
    stop, done = threading.Event(), threading.Event()
    real_start = deployments.watch._start_deployment_run

    def start_and_signal(deployment, parameters, what):
        real_start(deployment, parameters, what)
        done.set()

    def burst():
        time.sleep(0.5)
        for i in range(3):
            write_audio(root / f"take{i}.wav", seconds=0.1)
            time.sleep(0.1)

    monkeypatch.setattr(deployments.watch, "_start_deployment_run", start_and_signal)
    thread = run_in_background(burst, stop, done, linger=1.0)
    watch(root, deployment="extract-features/watch-test", store=tmp_path / "store",
          parameters={"dataset": "dropbox"}, stable_seconds=1.0, debounce_seconds=0.3, stop_event=stop)
    thread.join()
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])))
    assert len(runs) == 1
    assert runs[0].parameters == {"audio_dir": str(root), "store": str(tmp_path / "store"), "dataset": "dropbox"}


@pytest.mark.usefixtures("prefect_api")
def test_watch_command_logs_with_times_and_calls_files_at_start_what_they_are(tmp_path, root, tiny_model,
                                                                              prefect_api):
    """`mess-ai watch --local` as a person runs it, on a folder whose recordings are extracted already."""
    write_audio(root / "a.wav", seconds=2.0)
    write_audio(root / "b.wav", seconds=2.0, frequency=300)
    config = ExtractConfig(model=tiny_model, device="cpu")
    assert run_extraction(root, tmp_path / "store", config=config).done == 2
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli", "watch", str(root), "--local", "--store", str(tmp_path / "store"),
         "--model", tiny_model, "--device", "cpu", "--stable-seconds", "0.3", "--debounce-seconds", "0.2"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=dict(os.environ, PREFECT_API_URL=prefect_api))
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line.rstrip("\n")) for line in proc.stdout], daemon=True).start()
    seen: list[str] = []

    def wait_for(text: str, limit: float = 120.0) -> None:
        deadline = time.monotonic() + limit
        while not any(text in line for line in seen):
            try:
                seen.append(lines.get(timeout=max(0.1, deadline - time.monotonic())))
            except queue.Empty:
                proc.kill()
                raise AssertionError(f"no line with {text!r} in {limit} s:\n" + "\n".join(seen)) from None

    try:
        wait_for("Extraction finished")
        write_audio(root / "c.wav", seconds=2.0, frequency=500)
        wait_for("1 new or changed recording is complete (c.wav)")
        wait_for("Extraction finished: 3 found")
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    ours = [line for line in seen if re.search(r"Watching|recording|Extraction finished", line)]
    assert len(ours) == 5, "\n".join(seen)
    stamp = r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d "
    assert all(re.match(stamp, line) for line in ours), "\n".join(ours)
    messages = [re.sub(stamp, "", line) for line in ours]
    assert messages[1] == ("Found 2 recordings in the folder at start (a.wav, b.wav): one run picks up any that are "
                           "new or changed; extracting in this process")
    assert messages[2] == ("Extraction finished: 2 found = 0 done (extracted now) + 0 failed now + 2 unchanged "
                           "(skipped).")
    assert messages[3] == "1 new or changed recording is complete (c.wav); extracting in this process"
    assert messages[4] == ("Extraction finished: 3 found = 1 done (extracted now) + 0 failed now + 2 unchanged "
                           "(skipped).")
