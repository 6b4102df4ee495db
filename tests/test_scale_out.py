"""Scale-out over Prefect itself: the ``sharded`` deployment on two process workers, the manifest on PostgreSQL.

The end-to-end test is marked ``e2e_scale`` and runs with ``make e2e-scale`` (not in CI). The claim race below it
is fast and runs in the default suite: on SQLite always, on PostgreSQL when its binaries and psycopg are here.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

import pytest
from sqlalchemy import select

from mess_ai.store import DONE, Manifest
from mess_ai.store.manifest import claims, sqlite_url
from tests.helpers.audio import write_audio
from tests.helpers.postgres import postgres_server, unavailable_reason
from tests.helpers.prefect_server import PREFECT, REPO_ROOT, prefect_server, start, stop

POOL = "mess-ai-process"
WORKERS = ("scale-worker-a", "scale-worker-b")


@pytest.fixture(scope="module")
def postgres():
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    with postgres_server() as server:
        yield server


# --- the manifest as several workers share it: SQLite, and PostgreSQL when it is here ------------------------


def _race(manifests: list[Manifest], tracks: list[str], threads_per_manifest: int) -> dict[str, list[str]]:
    """Threads of every manifest claim every track in the same order, all at once, each as a process of its own
    host (as ``ClaimedTrackLock`` does); returns who won each track."""
    winners: dict[str, list[str]] = defaultdict(list)
    guard = threading.Lock()
    owners = [(m, f"host{i}-{j}:{1000 + j}:{i:02x}{j:02x}") for i, m in enumerate(manifests)
              for j in range(threads_per_manifest)]
    start_together = threading.Barrier(len(owners))
    errors: list[BaseException] = []

    def hammer(manifest: Manifest, owner: str) -> None:
        try:
            start_together.wait()
            for track in tracks:
                if manifest.claim("race", track, owner, ttl_seconds=600, same_host_prefix=owner.split(":")[0] + ":"):
                    with guard:
                        winners[track].append(owner)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    threads = [threading.Thread(target=hammer, args=pair) for pair in owners]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    return winners


@pytest.fixture(params=["sqlite", "postgresql"])
def manifest_url(request, tmp_path):
    if request.param == "sqlite":
        return sqlite_url(str(tmp_path / "manifest.sqlite"))
    return request.getfixturevalue("postgres").create_database(f"race_{tmp_path.name.lower()}"[:60])


def test_two_manifests_never_both_claim_a_track(manifest_url):
    first, second = Manifest(manifest_url), Manifest(manifest_url)
    tracks = [f"t{i:03d}" for i in range(120)]
    # Every other track starts with an expired claim of a dead worker elsewhere: there the race is between
    # the takeover UPDATEs, on the others between INSERTs.
    for track in tracks[::2]:
        assert first.claim("race", track, "gone:1:00", ttl_seconds=-60)
    try:
        winners = _race([first, second], tracks, threads_per_manifest=4)
        with first.engine.connect() as conn:
            held = {t: o for t, o in conn.execute(
                select(claims.c.track_id, claims.c.owner).where(claims.c.dataset == "race"))}
    finally:
        first.close()
        second.close()
    doubles = {t: w for t, w in winners.items() if len(w) != 1}
    assert not doubles, f"tracks won by more than one owner: {doubles}"
    assert sorted(winners) == tracks
    assert held == {t: w[0] for t, w in winners.items()}


def test_manifest_holds_real_file_sizes_and_times(manifest_url):
    """A nanosecond mtime (~1.8e18) and a file over 2 GiB fit the columns (PostgreSQL's INTEGER is 32-bit)."""
    manifest = Manifest(manifest_url)
    try:
        manifest.begin_attempt("big", "t1", source_path="/x/long.wav", relative_path="long.wav", size=5 * 2**30,
                               mtime_ns=time.time_ns(), sha256="aa", config_key="k1")
        row = manifest.get("big", "t1")
    finally:
        manifest.close()
    assert row["size"] == 5 * 2**30 and row["mtime_ns"] > 2**60


# --- end to end: two workers, one folder, PostgreSQL ---------------------------------------------------------


def _prefect(env: dict[str, str], *args: str) -> str:
    proc = subprocess.run([PREFECT, "--no-prompt", *args], env=env, cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, f"prefect {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def _wait_final(client, flow_run_id: str, timeout: float):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = client.read_flow_run(flow_run_id)
        if run.state is not None and run.state.is_final():
            return run
        time.sleep(1)
    raise TimeoutError(f"flow run {flow_run_id} not finished after {timeout:.0f} s")


def _flow_runs(event) -> set[str]:
    return {r.id.removeprefix("prefect.flow-run.") for r in event.related if r.role == "flow-run"}


def _events_about(client, name: str, run_ids: list[str], timeout: float = 60.0) -> list:
    """The events called ``name`` related to any of ``run_ids``, read again until each run has one (the server
    stores events in batches, a few seconds after they happen)."""
    from prefect.events.filters import EventFilter, EventNameFilter

    deadline = time.monotonic() + timeout
    while True:
        page = client.read_events(EventFilter(event=EventNameFilter(name=[name])), limit=50)
        events = list(page.events)
        while page.next_page:
            page = client.read_events_page(page.next_page)
            events += page.events
        events = [e for e in events if _flow_runs(e) & set(run_ids)]
        if set(run_ids) <= set().union(*map(_flow_runs, events)) or time.monotonic() > deadline:
            return events
        time.sleep(1)


def _asked_for_slot_by(client, run_ids: list[str]) -> dict[str, float]:
    """{flow run: time} by which each run had asked for the GPU slot: its first ``process-chunk`` task's start (a
    run asks for the slot right before it submits its first chunk)."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, TaskRunFilter, TaskRunFilterName

    runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=run_ids)),
                                 task_run_filter=TaskRunFilter(name=TaskRunFilterName(like_="process-chunk")))
    asked: dict[str, float] = {}
    for r in runs:
        if r.start_time is not None:
            run = str(r.flow_run_id)
            asked[run] = min(asked.get(run, float("inf")), r.start_time.timestamp())
    return asked


def _write_folder(folder: Path, count: int) -> list[str]:
    """``count`` recordings of different lengths, rates and formats, so the shards differ in bytes; long enough
    (8 to 30 s) that on a CPU the shards' model work takes seconds, and shards running at once want the slot at
    the same time."""
    names = []
    for i in range(count):
        name = f"take-{i:02d}.{'flac' if i % 3 == 0 else 'wav'}"
        write_audio(folder / name, seconds=8.0 + 2 * i, sample_rate=(24000, 44100)[i % 2], frequency=220.0 + 40 * i,
                    seed=i)
        names.append(name)
    return names


@pytest.mark.e2e_scale
def test_sharded_run_on_two_workers_extracts_each_file_once(tmp_path, tiny_model, postgres):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, PREFECT_LOCAL_STORAGE_PATH, temporary_settings

    incoming, store, results = tmp_path / "incoming", tmp_path / "store", tmp_path / "results"
    names = _write_folder(incoming, 12)
    manifest_url = postgres.create_database("scale")
    host_limit = f"gpu:{socket.gethostname()}"
    with prefect_server(tmp_path / "prefect") as (api_url, env):
        env.update(MESS_AI_INCOMING=str(incoming), MESS_AI_STORE=str(store), MESS_AI_MODEL=tiny_model,
                   MESS_AI_TIMEZONE="UTC", MESS_AI_CODE_DIR=str(REPO_ROOT), MESS_AI_MANIFEST_URL=manifest_url,
                   # Flow return values (each shard's RunSummary, with its model-work intervals) are kept on disk
                   # for the checks below; task results are not, so the shards run exactly as they would.
                   PREFECT_RESULTS_PERSIST_BY_DEFAULT="true", PREFECT_TASKS_DEFAULT_PERSIST_RESULT="false",
                   PREFECT_LOCAL_STORAGE_PATH=str(results), PREFECT_WORKER_QUERY_SECONDS="2")
        _prefect(env, "work-pool", "create", POOL, "--type", "process")
        _prefect(env, "deploy", "--all")
        # At most two flow runs per worker: the parent takes one place on its worker, so the four shards cannot
        # all go to one worker while the other idles.
        workers = [start([PREFECT, "worker", "start", "--pool", POOL, "--name", name, "--limit", "2"], env,
                         tmp_path / f"{name}.log") for name in WORKERS]
        try:
            started = time.monotonic()
            out = _prefect(env, "deployment", "run", "extract-sharded/sharded", "--params",
                           json.dumps({"manifest_url": manifest_url, "shards": 4, "poll_seconds": 1}))
            parent_id = next(line.split()[-1] for line in out.splitlines() if "UUID" in line)
            with temporary_settings({PREFECT_API_URL: api_url, PREFECT_LOCAL_STORAGE_PATH: results}), \
                    get_client(sync_client=True) as client:
                parent = _wait_final(client, parent_id, timeout=600)
                elapsed = time.monotonic() - started
                logs = "\n".join((tmp_path / f"{n}.log").read_text(errors="replace")[-4000:] for n in WORKERS)
                assert parent.state.is_completed(), f"{parent.state}\n{logs}"
                outcome = parent.state.result()
                child_ids = sorted(outcome["child_runs"])
                children = [client.read_flow_run(i) for i in child_ids]
                shard_deployment = client.read_deployment_by_name("extract-features/shard")
                submitted = _events_about(client, "prefect.worker.submitted-flow-run", child_ids)
                acquired = _events_about(client, "prefect.concurrency-limit.acquired", child_ids)
                released = _events_about(client, "prefect.concurrency-limit.released", child_ids)
                limits = {lim.name: lim for lim in client.read_global_concurrency_limits(limit=100)}
                asked_by = _asked_for_slot_by(client, child_ids)
                summaries = [c.state.result() for c in children]
        finally:
            for worker in workers:
                stop(worker)

    assert (outcome["files"], outcome["shards"], outcome["done"], outcome["failed"]) == (12, 4, 12, 0)
    assert set(outcome["child_runs"].values()) == {"COMPLETED"}
    assert {c.deployment_id for c in children} == {shard_deployment.id}

    # The shards split the folder: each file in exactly one shard, and extracted by that shard.
    shard_files = [sorted(c.parameters["files"]) for c in children]
    assert sorted(f for files in shard_files for f in files) == names
    for files, summary in zip(shard_files, summaries):
        assert sorted(o["relative_path"] for o in summary["outcomes"] if o["status"] == "done") == files

    # Both workers took part: which worker submitted each shard, from the workers' own events.
    worker_of = {run: e.resource.name for e in submitted for run in _flow_runs(e)}
    assert {worker_of.get(i) for i in child_ids} == set(WORKERS), worker_of

    # The GPU limit. The shards asked for "gpu:{host}"; the limit that exists is this host's, with one slot, free
    # again; Prefect's events show that every shard acquired it, and model work happens only inside it.
    assert {c.parameters["run"]["gpu_limit"] for c in children} == {"gpu:{host}"}
    assert [n for n in limits if n.startswith("gpu")] == [host_limit]
    assert (limits[host_limit].limit, limits[host_limit].active_slots) == (1, 0)
    acquired_by = set().union(*(_flow_runs(e) for e in acquired if e.resource.name == host_limit))
    assert set(child_ids) <= acquired_by
    # Each shard holds the slot once, from its first chunk to its last (the events' times), and no two hold it
    # at once,
    held: dict[str, list[float]] = {}
    for phase, events in (("acquired", acquired), ("released", released)):
        for event in events:
            if event.resource.name == host_limit:
                for run in _flow_runs(event) & set(child_ids):
                    held.setdefault(run, [0.0, 0.0])[phase == "released"] = event.occurred.timestamp()
    assert set(held) == set(child_ids) and all(0 < begin <= end for begin, end in held.values()), held
    holds = sorted((begin, end, run) for run, (begin, end) in held.items())
    assert not [(a, b) for a, b in zip(holds, holds[1:]) if b[0] < a[1]], f"two shards held the slot: {holds}"
    # so the model work of the four shard processes (wall-clock intervals, each inside its run's hold) never
    # overlaps,
    intervals = sorted((begin, end, child_ids[i]) for i, s in enumerate(summaries)
                       for begin, end, _ in s["model_work"])
    assert {run for _, _, run in intervals} == set(child_ids)
    outside = [(b, e, run) for b, e, run in intervals if not held[run][0] - 0.05 <= b <= e <= held[run][1] + 0.05]
    assert not outside, f"model work outside its run's hold of the slot: {outside} {held}"
    overlaps = [(a, b) for a, b in zip(intervals, intervals[1:]) if b[0] < a[1]]
    assert not overlaps, f"model work of two shards overlapped: {overlaps}"
    # ... and this is the limit's doing, not luck: some shard had asked for the slot while another one held it,
    # and got it only once that one gave it back.
    waited = [run for run in child_ids
              if any(asked_by[run] < end <= held[run][0] for begin, end, other in holds if other != run)]
    assert waited, f"no shard waited for the GPU slot while another held it: {asked_by} {holds}"

    # The shared manifest: each file done after exactly one attempt, no claim left behind.
    manifest = Manifest(manifest_url)
    try:
        rows = manifest.rows(incoming.name)
        with manifest.engine.connect() as conn:
            left = conn.execute(select(claims)).all()
    finally:
        manifest.close()
    assert [(r["relative_path"], r["status"], r["attempts"]) for r in rows] == [(n, DONE, 1) for n in names]
    assert left == []

    check = subprocess.run([str(Path(sys.executable).parent / "mess-ai"), "check", "--store", str(store),
                            "--manifest-url", manifest_url], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    print(f"sharded run of {len(names)} files on {len(WORKERS)} workers: {elapsed:.0f} s, "
          f"{len(waited)} of {len(children)} shards waited for the GPU slot")
