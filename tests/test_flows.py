"""The Prefect flows against a real (temporary) Prefect API: states, retries, artifacts, the GPU limit."""

from __future__ import annotations

import io
import logging
import re
import threading
import time

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
from prefect.client.schemas.sorting import ArtifactSort

import mess_ai.extraction.steps
from flows.extract import balanced_files_per_chunk
from mess_ai.audio import discover_audio
from mess_ai.features.device import STAND_IN_GPUS_ENV
from cli.report import print_summary
from mess_ai.pipeline import RunSummary
from mess_ai.reporting import artifact_key
from mess_ai.store import FeatureStore
from tests.helpers.audio import write_audio, write_empty, write_not_audio
from tests.helpers.flows import extract_flow

pytestmark = pytest.mark.usefixtures("prefect_api")


def run_flow(audio, store, model, **kwargs):
    kwargs.setdefault("retry_delay_seconds", 0)
    kwargs.setdefault("device", "cpu")
    return extract_flow(audio_dir=str(audio), store=str(store), model=model, **kwargs)


def latest_artifact(key):
    """The newest artifact with ``key``, read back through the Prefect client."""
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])),
                                          sort=ArtifactSort.CREATED_DESC, limit=1)
    assert artifacts, f"no artifact {key}"
    return artifacts[0]


def table(artifact):
    import json

    data = artifact.data
    return json.loads(data) if isinstance(data, str) else data


def test_good_and_bad_files_complete_with_failures_artifact(tmp_path, tiny_model):
    audio = tmp_path / "audio"
    for i in range(5):
        write_audio(audio / f"good{i}.wav", seconds=3.0 + i, frequency=200 + 50 * i)
    write_empty(audio / "bad" / "empty.wav")
    write_not_audio(audio / "bad" / "text.flac")
    state = run_flow(audio, tmp_path / "store", tiny_model, dataset="flowtest", files_per_task=2,
                     return_state=True)
    assert state.is_completed()
    result = state.result()
    assert (result["done"], result["failed"], result["exit_code"]) == (5, 2, 1)

    fs = FeatureStore(tmp_path / "store", "flowtest")
    rows = {r["relative_path"]: r for r in fs.manifest.rows("flowtest")}
    fs.close()
    assert {k for k, r in rows.items() if r["status"] == "failed"} == {"bad/empty.wav", "bad/text.flac"}
    assert all(r["attempts"] == 1 for r in rows.values())

    failed = table(latest_artifact(artifact_key("flowtest", "failed-files")))
    assert sorted(r["file"] for r in failed) == ["bad/empty.wav", "bad/text.flac"]
    assert all(r["stage"] == "validate" and r["reason"] and r["attempts"] == 1 for r in failed)

    summary = {r["measure"]: r["value"] for r in table(latest_artifact(artifact_key("flowtest", "run-summary")))}
    assert summary["done (extracted now)"] == 5 and summary["failed now"] == 2
    assert summary["new or changed (needed work)"] == 7
    assert summary["audio extracted (hours)"] == pytest.approx(sum(3 + i for i in range(5)) / 3600, abs=1e-3)
    stages = {r["stage"]: r for r in table(latest_artifact(artifact_key("flowtest", "stage-times")))}
    assert stages["preprocess"]["files"] == 5 and stages["extract"]["files"] == 5
    assert stages["extract"]["audio seconds"] == pytest.approx(25.0, abs=0.1)
    memory = table(latest_artifact(artifact_key("flowtest", "memory")))
    assert memory[0]["stage"] == "whole run" and memory[0]["peak RSS (MB)"] > 50
    assert "CPU-only run" in latest_artifact(artifact_key("flowtest", "gpu")).data
    progress = latest_artifact(artifact_key("flowtest", "progress"))
    assert float(progress.data) == 100.0

    again = run_flow(audio, tmp_path / "store", tiny_model, dataset="flowtest")
    assert again["model_loaded"] is False and again["unchanged"] == 5 and again["previously_failed"] == 2


def test_every_file_found_is_accounted_for_with_the_same_numbers_everywhere(tmp_path, tiny_model, caplog):
    """One run with a file of each kind: its result, its last log line, its run-summary, progress and stage-times
    artifacts and the CLI's summary give the same numbers, and they add up to the files found."""
    audio, store = tmp_path / "audio", tmp_path / "store"
    write_audio(audio / "before_ok.wav", seconds=2.0)
    write_not_audio(audio / "before_bad.wav")
    first = run_flow(audio, store, tiny_model, dataset="tally")
    assert (first["done"], first["failed"]) == (1, 1)

    write_audio(audio / "new.wav", seconds=2.0, frequency=300)
    write_not_audio(audio / "new_bad.flac")
    write_audio(audio / "held.wav", seconds=2.0, frequency=350)
    write_audio(audio / "other_shard.wav", seconds=2.0, frequency=400)
    found = discover_audio(audio)
    holder = FeatureStore(store, "tally")
    lock = holder.lock(next(s.track_id for s in found if s.relative == "held.wav"))
    lock.acquire()  # another run is extracting held.wav right now
    caplog.clear()
    try:
        with caplog.at_level(logging.INFO, logger="prefect.flow_runs"):
            result = run_flow(audio, store, tiny_model, dataset="tally",
                              files=[s.relative for s in found if s.relative != "other_shard.wav"])
    finally:
        lock.release()
        holder.close()

    expected = {"discovered": 6, "done": 1, "failed": 1, "unchanged": 1, "previously_failed": 1, "busy": 1,
                "not_selected": 1, "left": 0}
    assert {k: result[k] for k in expected} == expected
    counts = RunSummary.from_dict(result).counts
    assert sum(count for _, count in counts.categories()) == counts.discovered == len(found)
    assert counts.new_or_changed == 3  # new.wav, new_bad.flac, held.wav
    by_label = {"done (extracted now)": 1, "failed now": 1, "unchanged (skipped)": 1,
                "failed before, same bytes (not retried)": 1, "busy (another run holds it)": 1, "not selected": 1}
    sentence = " + ".join(f"{n} {label}" for label, n in by_label.items())

    done_lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Done: ")]
    assert len(done_lines) == 1 and done_lines[0].startswith(f"Done: 6 found = {sentence}; ")

    summary = {r["measure"]: r["value"] for r in table(latest_artifact(artifact_key("tally", "run-summary")))}
    assert summary["audio files found"] == 6 and summary["new or changed (needed work)"] == 3
    assert {label: summary[label] for label in by_label} == by_label
    assert summary["left for the next run (stopped early)"] == 0
    progress = latest_artifact(artifact_key("tally", "progress"))
    assert float(progress.data) == 100.0
    assert progress.description == f"6 of 6 files settled (6 found = {sentence})"
    stages = {r["stage"]: r["files"] for r in table(latest_artifact(artifact_key("tally", "stage-times")))}
    assert (stages["discover"], stages["validate"], stages["preprocess"], stages["extract"]) == (6, 3, 1, 1)

    out = io.StringIO()
    print_summary(RunSummary.from_dict(result), out)
    printed = out.getvalue()
    assert "6 audio files found" in printed
    lines = dict(re.findall(r"^  ([^:\n]+(?:, [^:\n]+)?): +(\d+)$", printed, re.MULTILINE))
    assert {label: int(lines[label]) for label in by_label} == by_label
    assert int(lines["new or changed (needed work)"]) == 3


def test_transient_failure_is_retried_and_succeeds(tmp_path, tiny_model, monkeypatch):
    audio = tmp_path / "audio"
    write_audio(audio / "flaky.wav", seconds=3.0)
    write_audio(audio / "steady.wav", seconds=3.0, frequency=300)
    write_audio(audio / "short.wav", seconds=0.3)
    real_load = mess_ai.extraction.steps.load_mono
    calls = {"flaky.wav": 0}

    def flaky_load(opened, rate, **kwargs):  # fault injection: the first read of flaky.wav hits an I/O error
        if opened.path.name == "flaky.wav":
            calls["flaky.wav"] += 1
            if calls["flaky.wav"] == 1:
                raise OSError(5, "Input/output error (injected)")
        return real_load(opened, rate, **kwargs)

    monkeypatch.setattr(mess_ai.extraction.steps, "load_mono", flaky_load)
    result = run_flow(audio, tmp_path / "store", tiny_model, files_per_task=8)
    assert calls["flaky.wav"] == 2
    fs = FeatureStore(tmp_path / "store", "audio")
    rows = {r["relative_path"]: r for r in fs.manifest.rows("audio")}
    fs.close()
    assert (rows["flaky.wav"]["status"], rows["flaky.wav"]["attempts"]) == ("done", 2)
    assert (rows["steady.wav"]["status"], rows["steady.wav"]["attempts"]) == ("done", 1)
    assert (rows["short.wav"]["status"], rows["short.wav"]["attempts"]) == ("failed", 1)  # not retried
    assert result["done"] == 2 and result["failed"] == 1


def test_persistent_transient_failure_recorded_after_last_attempt(tmp_path, tiny_model, monkeypatch):
    audio = tmp_path / "audio"
    write_audio(audio / "broken_disk.wav", seconds=3.0)
    write_audio(audio / "fine.wav", seconds=3.0, frequency=300)
    real_load = mess_ai.extraction.steps.load_mono

    def failing_load(opened, rate, **kwargs):
        if opened.path.name == "broken_disk.wav":
            raise OSError(5, "Input/output error (injected)")
        return real_load(opened, rate, **kwargs)

    monkeypatch.setattr(mess_ai.extraction.steps, "load_mono", failing_load)
    state = run_flow(audio, tmp_path / "store", tiny_model, retries=2, return_state=True)
    assert state.is_completed()
    fs = FeatureStore(tmp_path / "store", "audio")
    row = {r["relative_path"]: r for r in fs.manifest.rows("audio")}["broken_disk.wav"]
    fs.close()
    assert (row["status"], row["attempts"], row["failure_stage"], row["permanent"]) == ("failed", 3, "preprocess",
                                                                                      False)
    assert "Input/output error" in row["error_message"]
    assert state.result()["done"] == 1


def test_unloadable_model_fails_the_run(tmp_path):
    write_audio(tmp_path / "audio" / "a.wav", seconds=2.0)
    state = run_flow(tmp_path / "audio", tmp_path / "store", str(tmp_path / "missing-model"), return_state=True)
    assert state.is_failed()


def test_two_runs_never_hold_more_than_the_limit(tmp_path, tiny_model, lock_dir, monkeypatch):
    """Two runs on a host of two (stand-in) GPUs, a limit of one slot: their model work takes turns, one chunk at a
    time over both runs."""
    monkeypatch.setenv(STAND_IN_GPUS_ENV, "2")
    results = {}

    def one(name):
        audio = tmp_path / name
        for i in range(4):
            write_audio(audio / f"t{i}.wav", seconds=6.0, frequency=200 + 40 * i, seed=i)
        results[name] = run_flow(audio, tmp_path / "store", tiny_model, device="cuda", files_per_task=1,
                                 gpu_limit="gpu-overlap-test", gpu_slots=1)

    threads = [threading.Thread(target=one, args=(name,)) for name in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    intervals = sorted(w for r in results.values() for w in r["model_work"])
    assert len(intervals) == 8 and all(r["done"] == 4 for r in results.values())
    for (start1, end1, _), (start2, end2, _) in zip(intervals, intervals[1:]):
        assert end1 <= start2, f"model work overlapped: {end1} > {start2}"


def test_a_run_waiting_for_a_busy_gpu_limit_is_told_to_ask_again_within_seconds(prefect_api):
    """The server tells a run denied a slot when to ask again (Retry-After): the slots' average hold time, up to
    30 s by default (x 1.3 jitter). A run holds its GPU slot for the whole run, minutes or hours, so a run waiting
    for the GPU kept it idle up to 39 s after the run before it let go. The API (as `make server` starts it) caps
    the wait at 5 s."""
    import httpx
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

    with get_client(sync_client=True) as client:
        client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name="gpu-retry-test", limit=1))
    slot = {"names": ["gpu-retry-test"], "slots": 1}
    with httpx.Client(base_url=prefect_api, timeout=30) as http:
        def post(path: str, body: dict) -> httpx.Response:
            for _ in range(20):  # SQLite busy (503): asked again, as Prefect's client does
                response = http.post(path, json=body)
                if response.status_code != 503:
                    return response
                time.sleep(0.5)
            return response

        for _ in range(10):  # runs that held the GPU ten minutes each
            assert post("/v2/concurrency_limits/increment", {**slot, "mode": "concurrency"}).is_success
            assert post("/v2/concurrency_limits/decrement", {**slot, "occupancy_seconds": 600}).is_success
        lease = {**slot, "mode": "concurrency", "lease_duration": 60}
        held = post("/v2/concurrency_limits/increment-with-lease", lease)
        assert held.status_code == 200, held.text
        waits = []
        for _ in range(10):
            denied = post("/v2/concurrency_limits/increment-with-lease", lease)
            assert denied.status_code == 423, denied.text  # the limit bites
            waits.append(float(denied.headers["Retry-After"]))
        http.delete(f"/v2/concurrency_limits/leases/{held.json()['lease_id']}")
    assert max(waits) <= 5 * 1.3, waits


def test_a_run_takes_its_gpu_slot_once_and_gives_it_back(tmp_path, tiny_model, monkeypatch):
    import tasks.extraction

    taken = []
    real_concurrency = tasks.extraction.concurrency

    def counting(names, **kwargs):
        taken.append(names)
        return real_concurrency(names, **kwargs)

    monkeypatch.setattr(tasks.extraction, "concurrency", counting)
    audio = tmp_path / "audio"
    for i in range(3):
        write_audio(audio / f"t{i}.wav", seconds=2.0, frequency=300 + 20 * i)
    result = run_flow(audio, tmp_path / "store", tiny_model, files_per_task=1, gpu_limit="gpu-once-test")
    assert result["done"] == 3 and len(result["model_work"]) == 3
    # Two chunks in flight take turns on one extractor: the model's seconds are counted once, within the turns.
    assert result["stage_seconds"]["extract"] <= sum(end - start for start, end, _ in result["model_work"])
    assert taken == ["gpu-once-test"]
    with get_client(sync_client=True) as client:
        assert client.read_global_concurrency_limit_by_name("gpu-once-test").active_slots == 0
    # A run asks for its slot as it starts (while it plans); one that finds nothing to do gives it back.
    again = run_flow(audio, tmp_path / "store", tiny_model, files_per_task=1, gpu_limit="gpu-once-test")
    assert again["unchanged"] == 3 and not again["model_loaded"]
    assert taken == ["gpu-once-test", "gpu-once-test"]
    with get_client(sync_client=True) as client:
        assert client.read_global_concurrency_limit_by_name("gpu-once-test").active_slots == 0


@pytest.mark.parametrize(("files", "files_per_task", "expected"), [
    (1, 16, 1), (2, 16, 1), (3, 16, 2), (20, 16, 10), (33, 16, 11), (40, 16, 14), (5, 2, 2), (4, 1, 1)])
def test_chunks_are_even_and_at_least_two(files, files_per_task, expected):
    assert balanced_files_per_chunk(files, files_per_task) == expected


def test_only_failed_reruns_exactly_the_failed_files(tmp_path, tiny_model):
    audio = tmp_path / "audio"
    for i in range(3):
        write_audio(audio / f"ok{i}.wav", seconds=2.0, frequency=300 + 10 * i)
    write_audio(audio / "short1.wav", seconds=0.5)
    write_audio(audio / "short2.wav", seconds=0.5)
    run_flow(audio, tmp_path / "store", tiny_model)
    write_audio(audio / "short1.wav", seconds=1.5)  # fixed
    result = run_flow(audio, tmp_path / "store", tiny_model, only_failed=True)
    touched = {o["relative_path"]: o["status"] for o in result["outcomes"]}
    assert touched == {"short1.wav": "done", "short2.wav": "failed"}
    # The ok files were not selected: the summary still accounts for all five files found.
    assert (result["discovered"], result["done"], result["failed"], result["not_selected"]) == (5, 1, 1, 3)
    counts = RunSummary.from_dict(result).counts
    assert sum(count for _, count in counts.categories()) == 5 and counts.new_or_changed == 2
    summary = {r["measure"]: r["value"] for r in table(latest_artifact(artifact_key("audio", "run-summary")))}
    assert (summary["audio files found"], summary["not selected"], summary["unchanged (skipped)"]) == (5, 3, 0)
    fs = FeatureStore(tmp_path / "store", "audio")
    rows = {r["relative_path"]: r["attempts"] for r in fs.manifest.rows("audio")}
    fs.close()
    assert rows == {"ok0.wav": 1, "ok1.wav": 1, "ok2.wav": 1, "short1.wav": 1, "short2.wav": 2}


def test_analysis_flow_publishes_metrics_and_plots(tmp_path, tiny_model):
    from flows.analyze import analyze_store
    from cli.demo import write_demo_audio

    write_demo_audio(tmp_path / "audio")
    run_flow(tmp_path / "audio", tmp_path / "store", tiny_model, dataset="demo-analysis")
    # Labels naming a recording that is not extracted (the demo's broken file failed): the report's note says so.
    labels = tmp_path / "labels.csv"
    labels.write_text("file,instrument\narpeggio.ogg,piano\nstaccato.mp3,piano\nnot_really_audio.wav,none\n")
    report = analyze_store(store=str(tmp_path / "store"), dataset="demo-analysis", labels_csv=str(labels))
    assert report["n_tracks"] == 5 and "1 of 3 rows name recordings that are not extracted" in report["notes"][0]
    metrics = {r["measure"]: r["value"] for r in table(latest_artifact(artifact_key("demo-analysis",
                                                                                    "analysis-metrics")))}
    assert metrics["tracks"] == 5 and metrics["clusters (k-means)"] == report["clusters"]["n_clusters"]
    layers = table(latest_artifact(artifact_key("demo-analysis", "analysis-layers")))
    assert [row["layer"] for row in layers] == [0, 1, 2]
    plots = latest_artifact(artifact_key("demo-analysis", "analysis-plots")).data
    assert plots.count("data:image/png;base64,") == len(report["files"]["plots"]) >= 4
    assert f"## Notes\n\n- {report['notes'][0]}\n" in plots


def test_export_flow_writes_the_tables_and_publishes_what_it_wrote(tmp_path, tiny_model):
    from flows.export import export_store
    from tests.helpers.windowed import DURATIONS, extract, write_windowed_audio

    write_windowed_audio(tmp_path / "audio")
    extract(tmp_path / "audio", tmp_path / "store", tiny_model, "export-flow")
    result = export_store(store=str(tmp_path / "store"), out=str(tmp_path / "out"), layer="1")
    assert result["tracks"] == len(DURATIONS) and result["layer"] == 1 and result["written"]
    folder = tmp_path / "out" / "export-flow"
    assert result["folder"] == str(folder) and (folder / "export.json").exists()
    report = latest_artifact(artifact_key("export-flow", "export")).data
    assert f"| folder | `{folder}` |" in report and f"| tracks (rows of `tracks/`) | {len(DURATIONS)} |" in report
    assert f"**Written** ({len(result['written'])}): `{result['written'][0]}`" in report
    again = export_store(store=str(tmp_path / "store"), out=str(tmp_path / "out"), layer="1")
    assert again["written"] == [] and sorted(again["kept"]) == sorted(result["written"])
    assert "**Written** (0): none" in latest_artifact(artifact_key("export-flow", "export")).data
