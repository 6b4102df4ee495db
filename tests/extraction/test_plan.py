"""The plan as a pure function: manifest rows, file states and the content key in, one decision per file out.

No file, store or model: rows are dicts, file stats are plain objects with the fields the plan reads.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from mess_ai.extraction.plan import (
    Decision,
    FileState,
    Selection,
    decide,
    file_identity,
    known_sha256,
    needs_content,
    outputs_to_check,
    plan_files,
)
from mess_ai.store import DONE, FAILED, PENDING, ExpectedShapes

KEY = "key-of-this-run"
SHA = "a" * 64
PROVENANCE = {"config_key": KEY, "num_hidden_states": 3, "hidden_size": 16}


def row(status: str = DONE, sha256: str | None = SHA, config_key: str = KEY, **fields) -> dict:
    return {"status": status, "sha256": sha256, "config_key": config_key, "permanent": None, "unfinished": 0,
            "size": 100, "mtime_ns": 5, "file_identity": "7:9", "n_windows": 4, **fields}


def stat(size: int = 100, mtime_ns: int = 5, ino: int = 7, ctime_ns: int = 9) -> SimpleNamespace:
    return SimpleNamespace(st_size=size, st_mtime_ns=mtime_ns, st_ino=ino, st_ctime_ns=ctime_ns)


@pytest.mark.parametrize("state, expected", [
    (FileState("new.wav", None), Decision.TO_DO),
    (FileState("same.wav", row(), SHA, outputs_valid=True), Decision.UNCHANGED),
    (FileState("features_gone.wav", row(), SHA, outputs_valid=False), Decision.TO_DO),
    (FileState("changed.wav", row(), "b" * 64, outputs_valid=True), Decision.TO_DO),
    (FileState("unreadable_now.wav", row(), None, outputs_valid=True), Decision.TO_DO),
    (FileState("other_config.wav", row(config_key="old-key"), SHA, outputs_valid=True), Decision.TO_DO),
    (FileState("bad.wav", row(FAILED, permanent=True), SHA), Decision.PREVIOUSLY_FAILED),
    (FileState("bad_changed.wav", row(FAILED, permanent=True), "b" * 64), Decision.TO_DO),
    (FileState("io_error.wav", row(FAILED, permanent=False), SHA), Decision.TO_DO),
    (FileState("unknown_bytes.wav", row(FAILED, sha256=None, permanent=True), None), Decision.TO_DO),
    (FileState("given_back.wav", row(PENDING, unfinished=0)), Decision.TO_DO),
    (FileState("died_in.wav", row(PENDING, unfinished=2)), Decision.SUSPECT),
    # An MP3 longer than one decoding block, decoded before the fix of libsndfile's block reads: extracted again.
    (FileState("long.mp3", row(duration_seconds=45.0), SHA, outputs_valid=True), Decision.TO_DO),
    (FileState("long.MP3", row(duration_seconds=45.0, decoder_revision=1), SHA, outputs_valid=True), Decision.TO_DO),
    (FileState("fixed.mp3", row(duration_seconds=45.0, decoder_revision=2), SHA, outputs_valid=True),
     Decision.UNCHANGED),
    (FileState("one_block.mp3", row(duration_seconds=30.0), SHA, outputs_valid=True), Decision.UNCHANGED),
    (FileState("long.wav", row(duration_seconds=45.0), SHA, outputs_valid=True), Decision.UNCHANGED),
])
def test_each_file_gets_one_decision_from_its_row_and_bytes(state, expected):
    assert decide(state, KEY) == expected
    assert decide(state, KEY).needs_work == (expected in (Decision.TO_DO, Decision.SUSPECT))


def test_a_failed_only_run_takes_the_failed_files_whatever_their_bytes():
    failed_only = Selection(only_failed=True)
    assert decide(FileState("bad.wav", row(FAILED, permanent=True), SHA), KEY, failed_only) == Decision.TO_DO
    assert decide(FileState("io.wav", row(FAILED, permanent=False)), KEY, failed_only) == Decision.TO_DO
    assert decide(FileState("ok.wav", row(), SHA, True), KEY, failed_only) == Decision.NOT_SELECTED
    assert decide(FileState("new.wav", None), KEY, failed_only) == Decision.NOT_SELECTED
    assert decide(FileState("died_in.wav", row(PENDING, unfinished=1)), KEY, failed_only) == Decision.NOT_SELECTED


def test_a_shard_takes_only_the_files_it_names():
    shard = Selection(files=frozenset({"a.wav", "bad.wav"}))
    files = [FileState("a.wav", None), FileState("b.wav", None), FileState("bad.wav", row(FAILED, permanent=True))]
    assert plan_files(files, KEY, shard) == [Decision.TO_DO, Decision.NOT_SELECTED, Decision.TO_DO]
    both = Selection(only_failed=True, files=frozenset({"a.wav", "bad.wav"}))
    assert plan_files(files, KEY, both) == [Decision.NOT_SELECTED, Decision.NOT_SELECTED, Decision.TO_DO]


def test_the_plan_keeps_the_order_of_the_files():
    files = [FileState("z.wav", None), FileState("a.wav", row(), SHA, True),
             FileState("m.wav", row(PENDING, unfinished=1))]
    assert plan_files(files, KEY) == [Decision.TO_DO, Decision.UNCHANGED, Decision.SUSPECT]


def test_the_bytes_are_looked_at_only_where_a_row_of_this_key_could_settle_the_file():
    assert needs_content("a.wav", row(), KEY)
    assert needs_content("a.wav", row(FAILED, permanent=False), KEY)
    assert not needs_content("a.wav", None, KEY)
    assert not needs_content("a.wav", row(PENDING, unfinished=1), KEY)
    assert not needs_content("a.wav", row(config_key="old-key"), KEY)
    assert not needs_content("a.wav", row(FAILED), KEY, Selection(only_failed=True))
    assert not needs_content("a.wav", row(), KEY, Selection(files=frozenset({"b.wav"})))


def test_a_hash_is_reused_while_size_mtime_and_identity_are_those_hashed():
    assert known_sha256(row(), stat()) == SHA
    assert known_sha256(row(file_identity=None), stat(ino=8)) == SHA  # a row of an earlier version: no identity
    assert known_sha256(row(), stat(size=101)) is None
    assert known_sha256(row(), stat(mtime_ns=6)) is None
    assert known_sha256(row(), stat(ctime_ns=10)) is None  # `cp -p` keeps size and mtime, not the change time
    assert known_sha256(row(sha256=None), stat()) is None
    assert known_sha256(None, stat()) is None
    assert file_identity(stat()) == "7:9"


def test_stored_features_are_checked_only_for_done_rows_of_unchanged_bytes_and_this_provenance():
    assert outputs_to_check(row(), SHA, PROVENANCE, KEY) == ExpectedShapes(4, 3, 16)
    assert outputs_to_check(row(), "b" * 64, PROVENANCE, KEY) is None
    assert outputs_to_check(row(), None, PROVENANCE, KEY) is None
    assert outputs_to_check(row(FAILED, permanent=True), SHA, PROVENANCE, KEY) is None
    assert outputs_to_check(row(), SHA, {**PROVENANCE, "config_key": "old-key"}, KEY) is None
    assert outputs_to_check(row(), SHA, {}, KEY) is None
    assert outputs_to_check(None, SHA, PROVENANCE, KEY) is None
