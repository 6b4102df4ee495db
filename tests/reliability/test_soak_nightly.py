"""A compressed month of unattended nights (`make soak-nightly`, not in CI): `make server`, `make deploy`,
`make worker`, and 30 nights the server's scheduler starts every 20 s.

Before each night new recordings land in the incoming folder (a few good ones; a broken one on some nights). On
3 random nights the worker is SIGKILLed with its flow-run process mid-run and a new worker started; on 2 others
the server is stopped mid-run and started again on the same port and database. At the end: every good file done
exactly once and every broken one failed with its reason, `mess-ai check` clean, no run left Running or Pending,
every night Completed, Crashed (marked by the heartbeat automation) or Cancelled by the deployment's concurrency
limit while another night held its slot, and exactly one notification per bad night.

A night in flight while the server restarts is not promised to complete: a call it makes to the API during the
outage (taking the `gpu` slot, say) fails after the client's retries, and the run ends Failed (or Crashed). What
is promised is what follows: one "failed" (or "crashed"/"dead") message for it, its files done by a later night.
"""

from __future__ import annotations

import os
import random
import statistics
import subprocess
import sys
import time
from collections import Counter
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from tests.helpers.audio import write_audio, write_empty, write_header_only, write_not_audio
from tests.helpers.nightly import events, kill_tree, make, nightly_env, start_make, stop_tree, wait_until
from tests.helpers.prefect_server import REPO_ROOT, free_port, stop, wait_healthy
from tests.helpers.store_checks import feature_files, rows
from tests.helpers.webhook import webhook_receiver

pytestmark = [pytest.mark.soak_nightly,
              pytest.mark.skipif(sys.platform != "linux", reason="uses make, process groups and /proc")]

NIGHTS = 30
NIGHT_SECONDS = 20
SEED = 2026
KILLS = 3
RESTARTS = 2
BROKEN_NIGHTS = 6
# The last nights get no new recordings: whatever the nights before left (one cancelled behind a long one) is
# picked up by then.
QUIET_NIGHTS = 2
# Heartbeats come every 30 s (Prefect's minimum), so 45 s without one means dead even for a run that lives past
# its second heartbeat: a night in flight while the server restarts waits for the API and lasts longer than the
# few seconds a night takes otherwise (test_nightly's 20 s assumes every run ends before its second heartbeat).
ZOMBIE_SECONDS = 45
# A killed night is marked Crashed after ZOMBIE_SECONDS plus the automation's evaluation (the nights due meanwhile
# are cancelled); events are kept apart by this many nights so a night completes between two of them.
SPACING = 5
DROP_LEAD_SECONDS = 5
# How long a night may wait for the server: a restarted Prefect server on SQLite was seen stalled on "database is
# locked" for up to 3 minutes (docs/reliability.md).
NIGHT_WAIT_SECONDS = 300
BROKEN = {  # kind: (writer, the reason the manifest must give)
    "not-audio": (write_not_audio, "not an audio file"),
    "empty": (write_empty, "empty file"),
    "header-only": (write_header_only, "no audio data"),
}


def _plan(rng: random.Random) -> tuple[list[int], list[int], dict[int, str]]:
    """Kill nights, restart nights (kept ``SPACING`` apart, not the first nor the last nights) and broken
    nights (kind of the broken file), from ``rng``."""
    while True:
        events_at = sorted(rng.sample(range(2, NIGHTS - SPACING), KILLS + RESTARTS))
        if all(b - a >= SPACING for a, b in zip(events_at, events_at[1:])):
            break
    shuffled = rng.sample(events_at, len(events_at))
    kills, restarts = sorted(shuffled[:KILLS]), sorted(shuffled[KILLS:])
    broken = {n: rng.choice(sorted(BROKEN)) for n in rng.sample(range(NIGHTS - QUIET_NIGHTS), BROKEN_NIGHTS)}
    return kills, restarts, broken


def _drop(incoming: Path, staging: Path, night: int, rng: random.Random, long: bool, broken: str | None
          ) -> tuple[list[str], list[str]]:
    """Write the night's recordings beside the incoming folder and move each in at once (a half-written file is
    never seen). A night that is to be killed or restarted gets longer recordings, so it is caught mid-run."""
    good, bad = [], []
    count, seconds = (4, 20.0) if long else (rng.randint(2, 3), None)
    for i in range(count):
        name = f"night{night:02d}-{i}.wav"
        write_audio(staging / name, seconds=seconds or round(rng.uniform(3.0, 6.0), 1), seed=night * 10 + i)
        good.append(name)
    if broken:
        name = f"night{night:02d}-broken-{broken}.wav"
        BROKEN[broken][0](staging / name)
        bad.append(name)
    for name in good + bad:
        os.replace(staging / name, incoming / name)
    return good, bad


def _span(client, run) -> tuple[datetime, datetime] | None:
    """From the run's Pending (when it took the deployment's slot) to its end; None for a run that never ran."""
    taken = [state.timestamp for state in client.read_flow_run_states(run.id) if state.is_pending()]
    if not taken or run.end_time is None:
        return None
    return min(taken), run.end_time


def _sleep_until(moment: datetime) -> None:
    time.sleep(max(0.0, (moment - datetime.now(timezone.utc)).total_seconds()))


def test_soak_a_month_of_nights(tmp_path, tiny_model, figures):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterName,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import FlowRunSort
    from prefect.settings import PREFECT_API_URL, temporary_settings

    rng = random.Random(SEED)
    kill_nights, restart_nights, broken_nights = _plan(rng)
    incoming, store, staging, home = (tmp_path / n for n in ("incoming", "store", "staging", "prefect"))
    for folder in (incoming, staging, home):
        folder.mkdir()
    port = free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    good_files: dict[str, int] = {}  # name -> night it was dropped before
    broken_files: dict[str, str] = {}  # name -> kind
    kills: list[dict] = []
    restarts: list[dict] = []
    started = time.monotonic()
    with webhook_receiver() as (hook_url, received):
        env = nightly_env(home, incoming, store, tiny_model, NIGHT_SECONDS, hook_url, zombie_seconds=ZOMBIE_SECONDS)
        server = start_make("server", env, port, tmp_path / "server-1.log")
        workers = []
        try:
            wait_healthy(api_url)
            make("deploy", env, port)
            workers.append(start_make("worker", env, port, tmp_path / "worker-1.log"))

            with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
                def nightly_runs():
                    return client.read_flow_runs(
                        deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["nightly"])),
                        sort=FlowRunSort.EXPECTED_START_TIME_ASC, limit=200)

                def running_from(slot: datetime):
                    """The first night due at ``slot`` or later that runs and sent its first heartbeat."""
                    for run in nightly_runs():
                        if run.expected_start_time >= slot and run.state and run.state.is_running() and events(
                                api_url, f"prefect.flow-run.{run.id}", "prefect.flow-run.heartbeat"):
                            return run
                    return None

                # The scheduler creates the nights ahead (up to 100 of them); the soak's are the next NIGHTS.
                def planned():
                    soon = datetime.now(timezone.utc) + timedelta(seconds=15)
                    ahead = [run for run in nightly_runs() if run.expected_start_time > soon]
                    return len(ahead) >= NIGHTS and ahead[:NIGHTS]

                plan = wait_until(planned, 120, f"the scheduler to plan {NIGHTS} nights")
                night_ids, slots = [run.id for run in plan], [run.expected_start_time for run in plan]

                for night, slot in enumerate(slots):
                    _sleep_until(slot - timedelta(seconds=DROP_LEAD_SECONDS))
                    if night < NIGHTS - QUIET_NIGHTS:
                        long = night in kill_nights or night in restart_nights
                        good, bad = _drop(incoming, staging, night, rng, long, broken_nights.get(night))
                        good_files.update(dict.fromkeys(good, night))
                        broken_files.update({name: broken_nights[night] for name in bad})
                    if night in kill_nights:
                        run = wait_until(lambda s=slot: running_from(s), NIGHT_WAIT_SECONDS, f"night {night} to run")
                        kill_tree(workers[-1])
                        kills.append({"night": night, "run": run.id, "at": datetime.now(timezone.utc)})
                        workers.append(start_make("worker", env, port, tmp_path / f"worker-{len(workers) + 1}.log"))
                    elif night in restart_nights:
                        run = wait_until(lambda s=slot: running_from(s), NIGHT_WAIT_SECONDS, f"night {night} to run")
                        stopped = time.monotonic()
                        stop_tree(server)
                        server = start_make("server", env, port, tmp_path / f"server-{len(restarts) + 2}.log")
                        wait_healthy(api_url)
                        restarts.append({"night": night, "run": run.id, "down_s": time.monotonic() - stopped})

                # One run per night, the same ones as planned: none lost or doubled by the restarts.
                by_slot = {}
                for run in nightly_runs():
                    if slots[0] <= run.expected_start_time <= slots[-1]:
                        by_slot.setdefault(run.expected_start_time, []).append(run.id)
                assert [by_slot.get(slot) for slot in slots] == [[run_id] for run_id in night_ids], by_slot

                def all_final():
                    found = [client.read_flow_run(run_id) for run_id in night_ids]
                    return all(run.state and run.state.is_final() for run in found) and found

                nights = wait_until(all_final, 2 * NIGHT_WAIT_SECONDS, "every night to end", poll=2)
                # The month is over: no more nights (a night in flight now is not one left behind).
                client.pause_deployment(client.read_deployment_by_name("extract-features/nightly").id)

                def in_flight():
                    live = FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(
                        any_=[StateType.RUNNING, StateType.PENDING])))
                    return [f"{r.name}: {r.state.name}" for r in client.read_flow_runs(flow_run_filter=live)]

                time.sleep(30)  # a late or duplicate message would come within the notification window
                try:
                    wait_until(lambda: not in_flight(), 60, "the runs in flight to end")
                except AssertionError:
                    pass  # reported below
                leftover = in_flight()
                spans = {run.id: _span(client, run) for run in nights}
                crashed_at = {run_id: client.read_flow_run(run_id).state.timestamp
                              for run_id in (k["run"] for k in kills)}
            workers_alive = sum(worker.poll() is None for worker in workers)
        finally:
            for worker in workers:
                stop(worker)
            stop(server)
    wall_seconds = time.monotonic() - started
    check = subprocess.run([sys.executable, "-m", "cli", "check", "--store", str(store)], cwd=REPO_ROOT,
                           capture_output=True, text=True, timeout=300)
    manifest = {row["relative_path"]: row for row in rows(store, "incoming").values()}

    killed_ids = {k["run"] for k in kills}
    restart_ids = {r["run"] for r in restarts}
    states = Counter(run.state.name for run in nights)

    def night_of(moment: datetime, others_than=None):
        """The night whose run spans ``moment`` (it held the deployment's slot then), if any."""
        return next((run for run in nights if run.id != others_than and spans[run.id]
                     and spans[run.id][0] <= moment <= spans[run.id][1]), None)

    broken_in = {}
    for name in broken_files:
        run = night_of(manifest[name]["last_attempt_at"].replace(tzinfo=timezone.utc))
        broken_in.setdefault(run.id if run else None, []).append(name)

    messages = received.snapshot()
    by_run: dict[str, list[str]] = {}
    for message in messages:
        by_run.setdefault(message.get("flow_run_id"), []).append(message.get("outcome"))
    attempts = Counter(row["attempts"] for name, row in manifest.items() if name in good_files)
    twice = sorted(name for name, row in manifest.items() if name in good_files and row["attempts"] > 1)
    cancelled = [run for run in nights if run.state.is_cancelled()]
    holders = [night_of(run.state.timestamp, others_than=run.id) for run in cancelled]
    durations = [run.total_run_time.total_seconds() for run in nights if run.state.is_completed()]
    figures({
        "nights": NIGHTS, "night_seconds": NIGHT_SECONDS, "seed": SEED, "zombie_seconds": ZOMBIE_SECONDS,
        "nights_by_state": dict(states),
        "timeline": "".join({"Completed": "C", "Crashed": "X", "Cancelled": "-", "Failed": "F"}.get(n.state.name, "?")
                            for n in nights),
        "kills": [k["night"] for k in kills], "restarts": [r["night"] for r in restarts],
        "restart_down_s": [round(r["down_s"], 1) for r in restarts],
        "restarted_nights_ended": [next(f"{n.state.name}: {n.state.message}"[:120] for n in nights if n.id == r["run"])
                                   for r in restarts],
        "kill_to_crashed_s": [round((crashed_at[k["run"]] - k["at"]).total_seconds()) for k in kills],
        "cancelled_nights": [nights.index(run) for run in cancelled],
        "cancelled_while_held_by": Counter(
            "killed night" if h and h.id in killed_ids else "restarted night" if h and h.id in restart_ids
            else "a live night" if h else "nobody" for h in holders),
        "files_good": len(good_files), "files_broken": len(broken_files),
        "manifest_rows": dict(Counter(row["status"] for row in manifest.values())),
        "attempts_of_good_files": dict(attempts), "attempted_twice": twice,
        "broken_attempted_in_killed_night": sorted(n for rid in killed_ids for n in broken_in.get(rid, [])),
        "notifications": dict(Counter(m.get("outcome") for m in messages)),
        "night_run_s_median_max": [round(statistics.median(durations), 1), round(max(durations), 1)],
        "workers_alive_at_end": workers_alive, "check_exit": check.returncode,
        "wall_s": round(wall_seconds),
    })

    # Nothing left Running or Pending; the workers lived through the server's restarts.
    assert not leftover, leftover
    assert workers_alive == 1, f"{workers_alive} of the last worker alive (earlier ones were killed)"
    # Every night ended Completed, Crashed (a killed one, by the automation) or Cancelled by design; a night in
    # flight while the server restarted completed, or failed or crashed if a call it made to the API met the
    # outage (its notification is checked below, and a later night did its work: the file checks).
    for index, run in enumerate(nights):
        state = run.state
        if run.id in killed_ids:
            assert state.is_crashed() and "No heartbeat" in (state.message or ""), (index, state)
        elif state.is_cancelled():
            assert "concurrency limit" in (state.message or ""), (index, state)
        elif run.id in restart_ids:
            assert state.is_completed() or state.is_failed() or state.is_crashed(), (index, state.name)
        else:
            assert state.is_completed(), (index, state.name, state.message)
    assert all(holders), [nights.index(run) for run, h in zip(cancelled, holders) if not h]
    # Every good file done exactly once (one row, features present), every broken one failed with its reason.
    assert set(manifest) == set(good_files) | set(broken_files), set(manifest) ^ (set(good_files) | set(broken_files))
    for name in good_files:
        assert manifest[name]["status"] == "done" and manifest[name]["n_windows"] > 0, manifest[name]
    for name in twice:
        first = manifest[name]["first_attempt_at"].replace(tzinfo=timezone.utc)
        assert night_of(first) is not None and night_of(first).id in killed_ids | restart_ids, (name, first)
    for name, kind in broken_files.items():
        row = manifest[name]
        assert row["status"] == "failed" and row["failure_stage"] == "validate", row
        assert BROKEN[kind][1] in row["error_message"], row
    assert len(feature_files(store)) == 2 * len(good_files)  # segments and aggregated, nothing else
    assert check.returncode == 0, check.stdout + check.stderr
    # Exactly one notification per bad night: a killed one is "dead"; a completed one with broken files in it
    # is "files-failed", naming them; none for the others.
    expected = {}
    for run in nights:
        if run.state.is_crashed():
            expected[str(run.id)] = ["dead" if "No heartbeat" in (run.state.message or "") else "crashed"]
        elif run.state.is_failed():
            expected[str(run.id)] = ["failed"]
        elif run.state.is_completed() and broken_in.get(run.id):
            expected[str(run.id)] = ["files-failed"]
    assert by_run == expected, messages
    for message in messages:
        if message["outcome"] == "files-failed":
            run_id = next(run.id for run in nights if str(run.id) == message["flow_run_id"])
            assert all(name in message["text"] for name in broken_in[run_id]), message
