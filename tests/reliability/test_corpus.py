"""A folder of every kind of broken and odd input, through the real pipeline: the run completes, every valid file
is extracted correctly, every invalid one is recorded with its reason, and nothing partial is left."""

from __future__ import annotations

import numpy as np
import pytest

from mess_ai.audio import WindowSpec, discover_audio, window_bounds
from mess_ai.config import ExtractConfig
from mess_ai.pipeline import run_extraction
from mess_ai.store import DONE, FAILED, FeatureStore, load_npy
from tests.helpers.corpus import DONE as EXPECT_DONE
from tests.helpers.corpus import FAILED as EXPECT_FAILED
from tests.helpers.corpus import IGNORED, build_corpus, write_not_utf8_name
from tests.helpers.audio import write_audio
from tests.helpers.store_checks import assert_consistent_after_crash, temp_files
from tests.helpers.flows import extract_flow

SR = 24000  # the tiny checkpoint's rate, as MERT-v1's
N_STATES, HIDDEN = 3, 32


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tiny_model):
    base = tmp_path_factory.mktemp("corpus")
    expected = build_corpus(base)
    summary = run_extraction(base / "audio", base / "store", dataset="corpus",
                             config=ExtractConfig(model=tiny_model, device="cpu"))
    return base, expected, summary


def test_corpus_has_every_kind_of_input(corpus):
    _, expected, _ = corpus
    kinds = {e.kind for e in expected.values()}
    assert len(kinds) >= 40
    assert {e.status for e in expected.values()} == {EXPECT_DONE, EXPECT_FAILED, IGNORED}


def test_every_file_discovered_or_ignored_as_expected(corpus):
    base, expected, summary = corpus
    outcomes = {o.relative_path: o.status for o in summary.outcomes}
    wanted = {rel: e.status for rel, e in expected.items() if e.status != IGNORED}
    assert outcomes == wanted
    assert summary.discovered == len(wanted)
    assert [s.relative for s in discover_audio(base / "audio")] == sorted(wanted)


def test_invalid_files_recorded_with_stage_and_reason(corpus):
    base, expected, summary = corpus
    failures = {f.relative_path: f for f in summary.failures}
    fs = FeatureStore(base / "store", "corpus")
    rows = {r["relative_path"]: r for r in fs.manifest.rows("corpus")}
    for rel, e in expected.items():
        if e.status != EXPECT_FAILED:
            continue
        outcome, row = failures[rel], rows[rel]
        assert (outcome.stage, row["failure_stage"]) == (e.stage, e.stage), rel
        assert e.reason in outcome.reason and row["error_message"] == outcome.reason, (rel, outcome.reason)
        assert row["status"] == FAILED and row["permanent"] and row["attempts"] == 1, rel
        assert row["error_class"] == "AudioError", rel
        for scale in ("segments", "aggregated", "raw"):
            assert not fs.path(scale, row["track_id"]).exists(), rel
    fs.close()


def test_valid_files_extracted_with_the_right_shapes(corpus):
    base, expected, summary = corpus
    fs = FeatureStore(base / "store", "corpus")
    rows = {r["relative_path"]: r for r in fs.manifest.rows("corpus")}
    for rel, e in expected.items():
        if e.status != EXPECT_DONE:
            continue
        row = rows[rel]
        assert row["status"] == DONE, rel
        if e.seconds is not None:
            assert row["duration_seconds"] == pytest.approx(e.seconds, abs=1e-3), rel
        n_windows = len(window_bounds(round(row["duration_seconds"] * SR), SR, WindowSpec()))
        segments = load_npy(fs.path("segments", row["track_id"]))
        aggregated = load_npy(fs.path("aggregated", row["track_id"]))
        assert row["n_windows"] == n_windows, rel
        assert segments.shape == (n_windows, N_STATES, HIDDEN) and segments.dtype == np.float32, rel
        assert aggregated.shape == (N_STATES, HIDDEN) and aggregated.dtype == np.float32, rel
        assert np.isfinite(segments).all() and np.isfinite(aggregated).all(), rel
    fs.close()
    long = rows["odd/ten_minutes.flac"]
    assert long["n_windows"] == 239  # 600 s in 5 s windows every 2.5 s


def test_same_audio_gives_same_features_whatever_the_name_or_container(corpus):
    base, expected, _ = corpus
    fs = FeatureStore(base / "store", "corpus")
    rows = {r["relative_path"]: r for r in fs.manifest.rows("corpus")}
    pairs = [(rel, e.same_audio_as) for rel, e in expected.items() if e.same_audio_as]
    assert len(pairs) >= 6
    for rel, reference in pairs:
        a = load_npy(fs.path("segments", rows[rel]["track_id"]))
        b = load_npy(fs.path("segments", rows[reference]["track_id"]))
        np.testing.assert_allclose(a, b, atol=1e-5, err_msg=f"{rel} vs {reference}")
        assert rows[rel]["track_id"] != rows[reference]["track_id"]
    fs.close()


def test_hostile_names_get_safe_track_ids_inside_the_store(corpus):
    base, expected, _ = corpus
    fs = FeatureStore(base / "store", "corpus")
    rows = {r["relative_path"]: r for r in fs.manifest.rows("corpus")}
    segments_dir = (base / "store" / "corpus" / "segments").resolve()
    for rel in (r for r in expected if r.startswith("names/")):
        track_id = rows[rel]["track_id"]
        assert track_id[0] not in "-." and set(track_id) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
                                                               "0123456789_-"), rel
        assert fs.path("segments", track_id).resolve().parent == segments_dir
    fs.close()
    assert not (base / "audio" / "names" / "pwned").exists() and not (base / "pwned").exists()


def test_run_completes_and_leaves_nothing_partial(corpus):
    base, expected, summary = corpus
    assert summary.integrity_problems == [] and summary.exit_code == 1  # 1: some files failed, as they must
    assert not temp_files(base / "store")
    counts = assert_consistent_after_crash(base / "store", "corpus", base / "audio")
    assert counts == {DONE: sum(e.status == EXPECT_DONE for e in expected.values()),
                      FAILED: sum(e.status == EXPECT_FAILED for e in expected.values()), "pending": 0}
    # Nothing outside the audio folder was read or written by the run.
    assert not (base / "outside" / "store").exists()


def test_rerun_over_the_corpus_changes_nothing(corpus, tiny_model):
    base, expected, first = corpus
    again = run_extraction(base / "audio", base / "store", dataset="corpus",
                           config=ExtractConfig(model=tiny_model, device="cpu"))
    assert (again.done, again.failed, again.unchanged, again.previously_failed) == (0, 0, first.done, first.failed)
    assert again.model_loaded is False


@pytest.mark.usefixtures("prefect_api")
def test_corpus_through_the_flow(tmp_path, tiny_model):
    """The Prefect flow over the same corpus (a 1-minute long file to save time): the same outcome per file."""

    expected = build_corpus(tmp_path, long_seconds=60.0)
    result = extract_flow(audio_dir=str(tmp_path / "audio"), store=str(tmp_path / "store"), model=tiny_model,
                         device="cpu", files_per_task=8, gpu_limit="", retry_delay_seconds=0)
    outcomes = {o["relative_path"]: o for o in result["outcomes"]}
    assert {rel: o["status"] for rel, o in outcomes.items()} == {
        rel: e.status for rel, e in expected.items() if e.status != IGNORED}
    for rel, e in expected.items():
        if e.status == EXPECT_FAILED:
            assert outcomes[rel]["stage"] == e.stage and e.reason in outcomes[rel]["reason"], rel
    assert result["integrity_problems"] == [] and not temp_files(tmp_path / "store")
    counts = assert_consistent_after_crash(tmp_path / "store", "audio", tmp_path / "audio")
    assert counts["pending"] == 0


def test_name_that_is_not_utf8_does_not_abort_the_run(tmp_path, tiny_model):
    write_audio(tmp_path / "audio" / "fine.wav", seconds=2.0)
    odd = write_not_utf8_name(tmp_path / "audio")
    summary = run_extraction(tmp_path / "audio", tmp_path / "store",
                             config=ExtractConfig(model=tiny_model, device="cpu"))
    outcomes = {o.relative_path: o for o in summary.outcomes}
    assert outcomes["fine.wav"].status == "done"
    # A valid WAV: extracted like any other; the manifest shows the odd bytes escaped.
    assert outcomes[odd.name].status == "done" and summary.integrity_problems == []
    fs = FeatureStore(tmp_path / "store", "audio")
    try:
        row = fs.manifest.get("audio", outcomes[odd.name].track_id)
    finally:
        fs.close()
    assert row["status"] == DONE and row["relative_path"] == "not-utf8-\\xff\\xfe.wav"
    again = run_extraction(tmp_path / "audio", tmp_path / "store", config=ExtractConfig(model=tiny_model, device="cpu"))
    assert again.done == 0 and again.unchanged == 2
