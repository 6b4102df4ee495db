import contextlib
import sqlite3

from sqlalchemy import func, insert, select, text

from mess_ai.store import DONE, FAILED, PENDING, Manifest
from mess_ai.store.manifest import sqlite_url, tracks


def _attempt(m, sha="aa", key="k1"):
    return m.begin_attempt("ds", "t1", source_path="/x/a.wav", relative_path="a.wav", size=10, mtime_ns=5,
                           sha256=sha, config_key=key)


def test_attempts_count_per_content_and_config(tmp_path):
    m = Manifest(sqlite_url(str(tmp_path / "m.sqlite")))
    assert _attempt(m) == 1
    assert m.get("ds", "t1")["status"] == PENDING
    m.mark_failed("ds", "t1", stage="load", error_class="OSError", message="disk hiccup", permanent=False,
                  seconds_spent=0.1)
    assert _attempt(m) == 2
    m.mark_failed("ds", "t1", stage="load", error_class="OSError", message="disk hiccup", permanent=False,
                  seconds_spent=0.1)
    row = m.get("ds", "t1")
    assert (row["status"], row["attempts"], row["failure_stage"], row["permanent"]) == (FAILED, 2, "load", False)
    first = row["first_attempt_at"]
    assert _attempt(m, sha="bb") == 1  # new bytes: fresh attempts
    assert m.get("ds", "t1")["first_attempt_at"] >= first
    m.mark_done("ds", "t1", duration_seconds=3.0, n_windows=1, seconds_spent=0.5)
    row = m.get("ds", "t1")
    assert row["status"] == DONE and row["error_message"] is None and row["n_windows"] == 1
    assert [r["track_id"] for r in m.rows("ds", DONE)] == ["t1"]
    assert m.rows("other") == []


def test_manifest_survives_reopen(tmp_path):
    url = sqlite_url(str(tmp_path / "m.sqlite"))
    m = Manifest(url)
    _attempt(m)
    m.close()
    assert Manifest(url).get("ds", "t1")["relative_path"] == "a.wav"


def test_claims_exclude_other_owners_until_expired_or_same_host(tmp_path):
    m = Manifest(sqlite_url(str(tmp_path / "m.sqlite")))
    assert m.claim("ds", "t1", "hostA:1:aa", ttl_seconds=60)
    assert m.claim("ds", "t1", "hostA:1:aa", ttl_seconds=60)  # renewing one's own
    assert not m.claim("ds", "t1", "hostB:2:bb", ttl_seconds=60)
    assert m.claimed_by_other("ds", "t1", "hostB:2:bb")
    # a process of hostA that holds the track's file lock takes over a claim left by a dead hostA process
    assert m.claim("ds", "t1", "hostA:3:cc", ttl_seconds=60, same_host_prefix="hostA:")
    assert not m.claim("ds", "t1", "hostB:2:bb", ttl_seconds=60, same_host_prefix="hostB:")
    m.release_claim("ds", "t1", "hostA:3:cc")
    assert m.claim("ds", "t1", "hostB:2:bb", ttl_seconds=-1)  # expired at once
    assert m.claim("ds", "t1", "hostC:4:dd", ttl_seconds=60)  # takes over the expired claim


def _query_plan(m, query) -> str:
    sql = str(query.compile(m.engine, compile_kwargs={"literal_binds": True}))
    with m.engine.connect() as conn:
        return " ".join(row[-1] for row in conn.execute(text(f"EXPLAIN QUERY PLAN {sql}")))


def test_status_listing_and_config_counts_use_their_indexes_also_on_a_manifest_created_without_them(tmp_path):
    path = tmp_path / "m.sqlite"
    m = Manifest(sqlite_url(str(path)))
    _attempt(m)
    by_status = select(tracks).where(tracks.c.dataset == "ds", tracks.c.status == FAILED)
    by_config = (select(tracks.c.features_config_key, func.count())
                 .where(tracks.c.dataset == "ds", tracks.c.features_config_key.is_not(None))
                 .group_by(tracks.c.features_config_key))
    assert "USING INDEX ix_tracks_dataset_status" in _query_plan(m, by_status)
    assert "USING COVERING INDEX ix_tracks_dataset_features_config" in _query_plan(m, by_config)
    m.close()
    # A manifest of an earlier mess-ai: the same table without the indexes.
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute("DROP INDEX ix_tracks_dataset_status")
        conn.execute("DROP INDEX ix_tracks_dataset_features_config")
        assert conn.execute("SELECT name FROM sqlite_master WHERE name LIKE 'ix_%'").fetchall() == []
    reopened = Manifest(sqlite_url(str(path)))
    assert "USING INDEX ix_tracks_dataset_status" in _query_plan(reopened, by_status)
    assert "USING COVERING INDEX ix_tracks_dataset_features_config" in _query_plan(reopened, by_config)
    assert reopened.get("ds", "t1")["relative_path"] == "a.wav"  # the rows as they were
    reopened.close()


def test_done_rows_record_their_sample_count_and_an_earlier_manifest_gains_the_column(tmp_path):
    path = tmp_path / "m.sqlite"
    m = Manifest(sqlite_url(str(path)))
    _attempt(m)
    m.mark_done("ds", "t1", duration_seconds=3.0, n_windows=1, seconds_spent=0.5, n_samples=72000)
    assert m.get("ds", "t1")["n_samples"] == 72000
    m.close()
    # A manifest of an earlier mess-ai: the table without the column; its rows read back with no sample count.
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute("ALTER TABLE tracks DROP COLUMN n_samples")
        conn.commit()
    reopened = Manifest(sqlite_url(str(path)))
    row = reopened.get("ds", "t1")
    assert row["n_samples"] is None and row["duration_seconds"] == 3.0
    reopened.close()


def test_rows_of_reads_the_rows_asked_for_by_key_whatever_their_number(tmp_path):
    m = Manifest(sqlite_url(str(tmp_path / "m.sqlite")))
    _attempt(m)
    row = m.get("ds", "t1")
    with m.engine.begin() as conn:
        conn.execute(insert(tracks), [{**row, "track_id": f"x{i:04d}"} for i in range(1200)])
    wanted = ["t1", "x0007", "missing", "x1199"] + [f"x{i:04d}" for i in range(100, 1100)]  # over two queries
    found = m.rows_of("ds", wanted)
    assert sorted(found) == sorted(set(wanted) - {"missing"})
    assert found["x0007"]["relative_path"] == "a.wav"
    assert set(m.rows_of("ds", ["t1"], ["status"])["t1"]) == {"track_id", "status"}
    assert m.rows_of("other", ["t1"]) == {}
    sql = select(tracks).where(tracks.c.dataset == "ds", tracks.c.track_id.in_(["t1", "x0007"]))
    assert "USING INDEX sqlite_autoindex_tracks_1 (dataset=? AND track_id=?)" in _query_plan(m, sql)
    m.close()
