"""prefect.yaml and `mess-ai serve`: the deployments as they are read, templated and built (no server needed)."""

from __future__ import annotations

import pytest
import yaml

from deployments.serve import REPO_ROOT, build_deployments, load_deployment_specs, resolve_templates
from flows.scale import split_into_shards

ENV = {"MESS_AI_INCOMING": "/data/in", "MESS_AI_STORE": "/data/store", "MESS_AI_MODEL": "m-a-p/MERT-v1-95M",
       "MESS_AI_TIMEZONE": "Europe/Berlin", "MESS_AI_CODE_DIR": "/srv/mess-ai",
       "MESS_AI_NIGHTLY_CRON": "0 2 * * *", "MESS_AI_HEARTBEAT_SECONDS": "60"}


def test_prefect_yaml_has_the_deployments_and_no_local_paths():
    text = (REPO_ROOT / "prefect.yaml").read_text()
    assert "/home/" not in text and "/work/" not in text and "/Users/" not in text
    names = [d["name"] for d in yaml.safe_load(text)["deployments"]]
    assert {"nightly", "manual", "on-new-audio", "retry-failed", "shard", "sharded", "analyze", "export"} <= set(names)


def test_templates_resolve_from_the_environment():
    specs = {s["name"]: s for s in load_deployment_specs(env=ENV)}
    assert specs["nightly"]["parameters"]["audio_dir"] == "/data/in"
    assert specs["nightly"]["schedules"][0] == {"cron": "0 2 * * *", "timezone": "Europe/Berlin", "active": True}
    assert specs["retry-failed"]["parameters"]["only_failed"] is True
    assert specs["retry-failed"]["parameters"]["store"] == "/data/store"
    assert specs["shard"]["parameters"]["run"] == {"files_per_task": 16, "gpu_limit": "gpu:{host}"}
    assert specs["nightly"]["parameters"]["run"] == {"files_per_task": 16, "gpu_limit": "gpu"}
    assert specs["nightly"]["parameters"]["config"] == {"model": "m-a-p/MERT-v1-95M", "device": "auto"}
    assert specs["sharded"]["parameters"]["config"] == specs["nightly"]["parameters"]["config"]
    assert "schedules" not in specs["manual"]
    assert specs["export"]["parameters"] == {"store": "/data/store", "out": "/data/store/exports"}
    with pytest.raises(KeyError, match="MESS_AI_STORE"):
        resolve_templates("{{ $MESS_AI_STORE }}", {})


def test_serve_builds_every_deployment():
    deployments = {d.name: d for d in build_deployments(load_deployment_specs(env=ENV))}
    assert deployments["nightly"].schedules[0].schedule.cron == "0 2 * * *"
    assert deployments["nightly"].schedules[0].schedule.timezone == "Europe/Berlin"
    assert deployments["on-new-audio"].concurrency_limit == 1
    assert deployments["manual"].parameters["store"] == "/data/store"
    assert not deployments["manual"].schedules
    assert deployments["export"].parameters["out"] == "/data/store/exports"
    # The UI's run form: the settings objects with each field's description.
    schema = deployments["manual"]._parameter_openapi_schema.model_dump()
    config = schema["definitions"]["ExtractConfig"]["properties"]
    assert "window" in config["window_seconds"]["description"].lower()
    assert config["precision"]["enum"] == ["auto", "fp32", "bf16"]
    assert "retries" in schema["definitions"]["RunOptions"]["properties"]


def test_shards_balance_bytes():
    sizes = {"a": 100, "b": 60, "c": 50, "d": 10}
    shards = split_into_shards(list(sizes), sizes, 2)
    assert sorted(map(sorted, shards)) == [["a", "d"], ["b", "c"]]
    assert split_into_shards(["a"], {"a": 1}, 3) == [["a"]]
    with pytest.raises(ValueError, match="0"):
        split_into_shards(["a"], {}, 0)


def test_make_server_and_the_test_servers_share_their_settings():
    """`make server` starts Prefect with the settings the tests' servers use (leases on disk, no analytics)."""
    from tests.helpers.prefect_server import SERVER_SETTINGS, make_server_start_lines

    starts = make_server_start_lines()
    if starts is None:
        pytest.skip("make is not installed")
    (start,) = starts
    assert all(f"{name}={value}" in start for name, value in SERVER_SETTINGS.items()), start


def test_a_dead_run_window_shorter_than_a_heartbeat_is_refused(monkeypatch):
    from deployments.automations import zombie_seconds

    monkeypatch.setenv("MESS_AI_HEARTBEAT_SECONDS", "60")
    monkeypatch.setenv("MESS_AI_ZOMBIE_SECONDS", "180")
    assert zombie_seconds() == 180
    monkeypatch.setenv("MESS_AI_ZOMBIE_SECONDS", "60")
    with pytest.raises(ValueError, match="MESS_AI_ZOMBIE_SECONDS=60 must be longer than MESS_AI_HEARTBEAT_SECONDS=60"):
        zombie_seconds()
