"""The manifest's password stays out of Prefect: never a flow parameter, log line, artifact, event or store file;
and out of the CLI's --help when the URL comes from the environment.

The end-to-end tests need a manifest whose URL carries a password that the database really checks. PostgreSQL is
not available here, and SQLite refuses URLs with a user or password, so the manifest is a SQLite file behind a
dialect that asks for the password first (``PasswordCheckingSQLite``, registered with SQLAlchemy below).
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from pathlib import Path

import pytest
from prefect.blocks.system import Secret
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterFlowRunId
from prefect.client.schemas.sorting import FlowRunSort
from prefect.events.filters import EventAnyResourceFilter, EventFilter
from prefect.events.worker import EventsWorker
from prefect.logging.handlers import APILogWorker
from prefect.settings import PREFECT_API_DATABASE_CONNECTION_URL
from sqlalchemy import URL, make_url
from sqlalchemy.dialects import registry
from sqlalchemy.dialects.sqlite.pysqlite import SQLiteDialect_pysqlite

from cli.main import main
from mess_ai.config import ExtractConfig
from mess_ai.pipeline import run_extraction
from mess_ai.store.manifest import MANIFEST_URL_ENV, resolve_manifest_url
from tests.helpers.audio import write_audio
from tests.helpers.flows import extract_flow

USER, PASSWORD = "someuser", "S3cretPassw0rd"
SECRET_BLOCK = "mess-ai-test-manifest"


class PasswordCheckingSQLite(SQLiteDialect_pysqlite):
    """pysqlite behind a password: a URL without the right one cannot open the file, as with a database server."""

    supports_statement_cache = True

    def create_connect_args(self, url):
        if (url.username, url.password) != (USER, PASSWORD):
            raise PermissionError(f"password authentication failed for user {url.username!r}")
        return super().create_connect_args(URL.create(url.drivername, database=url.database, query=url.query))


registry.register("sqlite.passwordchecked", __name__, "PasswordCheckingSQLite")


def manifest_url(path: Path, password: str = PASSWORD) -> str:
    return f"sqlite+passwordchecked://{USER}:{password}@/{path.absolute()}"


def run_flow(audio, store, model, **kwargs):
    return extract_flow(audio_dir=str(audio), store=str(store), model=model, device="cpu",
                       retry_delay_seconds=0, return_state=True, **kwargs)


def manifest_rows(path: Path) -> set[tuple[str, str, str]]:
    with sqlite3.connect(path) as conn:
        return set(conn.execute("SELECT dataset, relative_path, status FROM tracks"))


# --- the resolution, without Prefect --------------------------------------------------------------------------

def test_a_parameter_without_password_is_used_as_given():
    url = "postgresql+psycopg://mess_ai@db-host:5432/mess_ai"
    assert resolve_manifest_url(url, environ={MANIFEST_URL_ENV: "sqlite:////elsewhere.sqlite"}) == url
    assert resolve_manifest_url("sqlite:////srv/store/manifest.sqlite", environ={}) == (
        "sqlite:////srv/store/manifest.sqlite")


@pytest.mark.parametrize("url", [f"postgresql+psycopg://mess_ai:{PASSWORD}@db-host:5432/mess_ai",
                                 f"postgresql+psycopg://mess_ai@db-host/mess_ai?password={PASSWORD}"])
def test_a_parameter_with_a_password_is_refused_without_repeating_it(url):
    with pytest.raises(ValueError, match="carries a password") as refused:
        resolve_manifest_url(url, environ={})
    message = str(refused.value)
    assert MANIFEST_URL_ENV in message and "manifest_secret" in message and "db-host" in message
    assert PASSWORD not in message


def test_without_a_parameter_the_secret_then_the_environment_then_the_store():
    env = {MANIFEST_URL_ENV: f"postgresql+psycopg://mess_ai:{PASSWORD}@env-host/mess_ai"}
    assert resolve_manifest_url(None, environ=env) == env[MANIFEST_URL_ENV]
    assert resolve_manifest_url("", environ=env) == env[MANIFEST_URL_ENV]  # an empty form field is no parameter
    assert resolve_manifest_url(None, "postgresql://u:pw@secret-host/db", env) == "postgresql://u:pw@secret-host/db"
    assert resolve_manifest_url(None, environ={}) is None
    assert resolve_manifest_url(None, environ={MANIFEST_URL_ENV: ""}) is None  # `make worker`'s default


def test_a_parameter_and_a_secret_together_are_refused():
    with pytest.raises(ValueError, match="both manifest_url and manifest_secret"):
        resolve_manifest_url("sqlite:////a.sqlite", "sqlite:////b.sqlite", environ={})


# --- through Prefect ------------------------------------------------------------------------------------------

def _texts_from_the_api(flow_run_ids) -> list[str]:
    """Everything Prefect's API tells about these runs, as JSON: the runs (parameters included), their task runs,
    logs, artifacts and events, and the Secret block as a reader without include_secrets sees it."""
    APILogWorker.drain_all(timeout=30)
    EventsWorker.drain_all()
    runs = FlowRunFilter(id=FlowRunFilterId(any_=list(flow_run_ids)))
    with get_client(sync_client=True) as client:
        texts = [r.model_dump_json() for r in client.read_flow_runs(flow_run_filter=runs)]
        texts += [t.model_dump_json() for t in client.read_task_runs(flow_run_filter=runs)]
        texts += [a.model_dump_json() for a in client.read_artifacts(flow_run_filter=runs)]
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=list(flow_run_ids))))
        assert sum(log.message.startswith("Done:") for log in logs) == len(flow_run_ids)
        texts += [log.model_dump_json() for log in logs]
        resources = EventAnyResourceFilter(id=[f"prefect.flow-run.{i}" for i in flow_run_ids])
        deadline = time.monotonic() + 60
        while True:  # the server writes events in batches: wait until both runs' last events are in
            page = client.read_events(EventFilter(any_resource=resources), limit=50)
            events = list(page.events)
            while page.next_page:
                page = client.read_events_page(page.next_page)
                events += page.events
            if sum(e.event == "prefect.flow-run.Completed" for e in events) == len(flow_run_ids):
                break
            assert time.monotonic() < deadline, [e.event for e in events]
            time.sleep(0.5)
        texts += [e.model_dump_json() for e in events]
        block = client.read_block_document_by_name(SECRET_BLOCK, "secret", include_secrets=False)
        texts.append(block.model_dump_json())
    return texts


def _prefect_database_bytes() -> bytes:
    """The bytes of the API's SQLite database, with its write-ahead log (what is not checkpointed yet)."""
    database = Path(make_url(PREFECT_API_DATABASE_CONNECTION_URL.value()).database)
    assert database.is_file(), database
    return b"".join(p.read_bytes() for p in (database, Path(f"{database}-wal")) if p.exists())


def test_manifest_password_from_environment_or_secret_reaches_no_prefect_record(tmp_path, tiny_model, monkeypatch,
                                                                               prefect_api):
    audio, store, database = tmp_path / "audio", tmp_path / "store", tmp_path / "db" / "manifest.sqlite"
    database.parent.mkdir()
    write_audio(audio / "a.wav", seconds=3.0)
    write_audio(audio / "b.wav", seconds=3.0, frequency=300)
    url = manifest_url(database)

    monkeypatch.setenv(MANIFEST_URL_ENV, url)
    by_environment = run_flow(audio, store, tiny_model, dataset="by-environment")
    assert by_environment.is_completed(), by_environment.message

    Secret(value=url).save(SECRET_BLOCK, overwrite=True)
    # The secret wins: the environment now names a wrong password, which the database would refuse.
    monkeypatch.setenv(MANIFEST_URL_ENV, manifest_url(database, password="wrong"))
    by_secret = run_flow(audio, store, tiny_model, dataset="by-secret", manifest_secret=SECRET_BLOCK)
    assert by_secret.is_completed(), by_secret.message

    assert manifest_rows(database) == {(dataset, name, "done") for dataset in ("by-environment", "by-secret")
                                       for name in ("a.wav", "b.wav")}
    assert not (store / "manifest.sqlite").exists()  # the URL was used, not the store's default file
    store_files = [p for p in store.rglob("*") if p.is_file()]
    assert {"provenance.json"} <= {p.name for p in store_files}
    assert not [p for p in store_files if PASSWORD.encode() in p.read_bytes()]

    runs = [by_environment.state_details.flow_run_id, by_secret.state_details.flow_run_id]
    texts = _texts_from_the_api(runs)
    assert not [t for t in texts if PASSWORD in t]
    assert any('"manifest_secret":"mess-ai-test-manifest"' in t.replace(" ", "") for t in texts)
    with get_client(sync_client=True) as client:  # the block does hold it: the checks above looked at the right thing
        assert PASSWORD in str(client.read_block_document_by_name(SECRET_BLOCK, "secret").data["value"])
    stored = _prefect_database_bytes()
    assert b"by-environment" in stored  # the runs' parameters are in these bytes...
    assert PASSWORD.encode() not in stored  # ...and the password is not: block values are encrypted at rest


def test_flow_refuses_a_manifest_url_parameter_with_a_password(tmp_path, tiny_model, prefect_api):
    write_audio(tmp_path / "audio" / "a.wav", seconds=3.0)
    # Another password than the other tests': this one does reach Prefect, as the parameter of the refused run.
    state = run_flow(tmp_path / "audio", tmp_path / "store", tiny_model,
                     manifest_url=manifest_url(tmp_path / "manifest.sqlite", password="Refused0nly"))
    assert state.is_failed()
    with pytest.raises(ValueError, match="carries a password") as refused:
        state.result()
    assert MANIFEST_URL_ENV in str(refused.value) and "manifest_secret" in str(refused.value)
    assert "Refused0nly" not in str(refused.value) and "Refused0nly" not in (state.message or "")
    assert not (tmp_path / "store").exists()  # refused before anything was written


def test_cli_passes_its_manifest_url_through_the_environment(tmp_path, tiny_model, monkeypatch, prefect_api):
    audio, store, database = tmp_path / "audio", tmp_path / "store", tmp_path / "db" / "manifest.sqlite"
    database.parent.mkdir()
    write_audio(audio / "a.wav", seconds=3.0)
    monkeypatch.delenv(MANIFEST_URL_ENV, raising=False)
    assert main(["extract", str(audio), "--store", str(store), "--model", tiny_model, "--device", "cpu",
                 "--dataset", "from-cli", "--manifest-url", manifest_url(database)]) == 0
    assert manifest_rows(database) == {("from-cli", "a.wav", "done")}
    assert MANIFEST_URL_ENV not in os.environ  # put back as it was
    with get_client(sync_client=True) as client:
        recent = client.read_flow_runs(sort=FlowRunSort.START_TIME_DESC, limit=5)
    (run,) = [r for r in recent if r.parameters.get("dataset") == "from-cli"]
    assert run.parameters.get("manifest_url") is None
    assert PASSWORD not in run.model_dump_json()


def test_cli_takes_the_manifest_url_from_the_environment_and_never_shows_its_password(tmp_path, tiny_model,
                                                                                      monkeypatch, capsys):
    audio, store, database = tmp_path / "audio", tmp_path / "store", tmp_path / "db" / "manifest.sqlite"
    database.parent.mkdir()
    write_audio(audio / "ok.wav", seconds=2.0)
    write_audio(audio / "short.wav", seconds=0.5)
    run_extraction(audio, store, config=ExtractConfig(model=tiny_model, device="cpu"),
                   manifest_url=manifest_url(database))
    monkeypatch.setenv(MANIFEST_URL_ENV, manifest_url(database))
    assert main(["failures", "--store", str(store), "--json"]) == 0
    assert [row["relative_path"] for row in json.loads(capsys.readouterr().out)] == ["short.wav"]
    assert not (store / "manifest.sqlite").exists()  # the URL from the environment was used

    monkeypatch.setenv("COLUMNS", "400")  # each option's help on one line
    for url, password in ((manifest_url(database), PASSWORD), ("postgresql+psycopg://u:p%40ss%25@db/x", "p%40ss")):
        monkeypatch.setenv(MANIFEST_URL_ENV, url)
        for command in ("extract", "failures", "similar"):
            with pytest.raises(SystemExit):
                main([command, "--help"])
            shown = capsys.readouterr().out
            assert "$MESS_AI_MANIFEST_URL = " in shown and ":***@" in shown
            assert password not in shown and password.replace("%40", "@") not in shown
