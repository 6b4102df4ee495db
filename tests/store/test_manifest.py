from mess_ai.store import DONE, FAILED, PENDING, Manifest
from mess_ai.store.manifest import sqlite_url


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
