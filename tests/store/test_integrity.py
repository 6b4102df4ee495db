"""The integrity check: ``check`` while another run works on the store (what that run finishes meanwhile is no
problem), and a run's own check, of the tracks it wrote, beside ``check_store``'s of every track."""

from __future__ import annotations

from mess_ai.config import ExtractConfig
from mess_ai.pipeline import ExtractionSession, run_extraction
from mess_ai.store import DONE, FeatureStore, check_store
from mess_ai.store.atomic import temp_path_for
from mess_ai.store.integrity import IntegrityReport, check_dataset
from mess_ai.store.manifest import tracks
from tests.helpers.audio import write_audio


def test_track_finished_by_another_run_during_check_is_no_orphan(tmp_path, tiny_model):
    audio, store_root = tmp_path / "audio", tmp_path / "store"
    write_audio(audio / "t0.wav", seconds=6.0)
    summary = run_extraction(audio, store_root, config=ExtractConfig(model=tiny_model, device="cpu"))
    track_id = summary.outcomes[0].track_id
    store = FeatureStore(store_root, "audio")
    try:
        row = store.manifest.get("audio", track_id)
        # Another run is re-extracting the track: its row is pending when check reads the rows...
        store.manifest.begin_attempt("audio", track_id, source_path=row["source_path"],
                                     relative_path=row["relative_path"], size=row["size"],
                                     mtime_ns=row["mtime_ns"], sha256=row["sha256"], config_key=row["config_key"])
        listed = store.feature_files

        def finish_then_list():
            # ...and it has written the files, marked the track done and released its lock when check lists them.
            store.manifest.mark_done("audio", track_id, duration_seconds=row["duration_seconds"],
                                     n_windows=row["n_windows"], seconds_spent=1.0)
            yield from listed()

        store.feature_files = finish_then_list
        report = IntegrityReport()
        check_dataset(store, report)
        assert report.problems == []
        assert store.manifest.get("audio", track_id)["status"] == DONE

        # A track being redone keeps its earlier features until new ones replace them: no orphans.
        store.manifest.begin_attempt("audio", track_id, source_path=row["source_path"],
                                     relative_path=row["relative_path"], size=row["size"],
                                     mtime_ns=row["mtime_ns"], sha256=row["sha256"], config_key=row["config_key"])
        store.feature_files = listed
        report = IntegrityReport()
        check_dataset(store, report)
        assert report.problems == [] and report.tracks_checked == 1

        # A feature file whose pending row records no features, with nobody holding the track, is reported.
        with store.manifest.engine.begin() as conn:
            conn.execute(tracks.update().values(features_config_key=None, features_n_windows=None))
        report = IntegrityReport()
        check_dataset(store, report)
        assert sorted(p.reason for p in report.problems) == [
            "orphan aggregated file (pending)", "orphan segments file (pending)"]
    finally:
        store.close()


def test_a_run_checks_the_tracks_it_wrote_and_check_store_every_track(tmp_path, tiny_model):
    audio, store_root = tmp_path / "audio", tmp_path / "store"
    config = ExtractConfig(model=tiny_model, device="cpu")
    write_audio(audio / "old.wav", seconds=2.0)
    old = run_extraction(audio, store_root, config=config).outcomes[0].track_id
    write_audio(audio / "new.wav", seconds=2.0, frequency=300)
    session = ExtractionSession(store_root, "audio", config)
    try:
        pending = session.plan(session.discover(audio))
        assert [s.relative for s in pending] == ["new.wav"]
        session.extract(session.preprocess(session.validate(pending)))
        new = pending[0].track_id
        # Damage in both tracks: a truncated segments file, and a temporary file left by a run killed meanwhile.
        temps = []
        for track_id in (old, new):
            segments = session.store.path("segments", track_id)
            with open(segments, "r+b") as npy:
                npy.truncate(segments.stat().st_size // 2)
            temps.append(temp_path_for(session.store.path("aggregated", track_id)))
            temps[-1].write_bytes(b"half")
        report = session.check()
    finally:
        session.close()
    assert report.scope == "the 1 track this run extracted or failed"
    assert [(p.track_id, p.reason.split(":")[0]) for p in report.problems] == [(new, "segments")]
    assert report.describe().startswith("Store check of the 1 track this run extracted or failed: 1 problem: ")
    assert not any(temp.exists() for temp in temps)  # swept by the run, once, at its end
    # The old track is not this run's to check: `mess-ai check` finds its damage.
    full = check_store(store_root, "audio")
    assert sorted((p.track_id, p.reason.split(":")[0]) for p in full.problems) == sorted(
        [(old, "segments"), (new, "segments")])
