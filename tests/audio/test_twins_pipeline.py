"""Two files whose names differ only in Unicode normalisation are extracted as two tracks, end to end."""

from __future__ import annotations

from mess_ai.config import ExtractConfig
from mess_ai.pipeline import run_extraction
from mess_ai.store import DONE, FeatureStore
from tests.audio.test_discovery import NFC_CAFE, NFD_CAFE, skip_unless_twins_can_exist
from tests.helpers.audio import write_audio


def test_twins_are_extracted_as_two_done_tracks(tmp_path, tiny_model):
    skip_unless_twins_can_exist(tmp_path)
    audio, store = tmp_path / "audio", tmp_path / "store"
    write_audio(audio / f"{NFC_CAFE}.wav", frequency=440)
    write_audio(audio / f"{NFD_CAFE}.wav", frequency=660)
    summary = run_extraction(audio, store, dataset="ds", config=ExtractConfig(model=tiny_model, device="cpu"))
    assert (summary.discovered, summary.done, summary.failed) == (2, 2, 0)
    fs = FeatureStore(store, "ds")
    try:
        rows = fs.manifest.rows_by_track("ds")
        assert sorted(row["relative_path"] for row in rows.values()) == sorted([f"{NFC_CAFE}.wav", f"{NFD_CAFE}.wav"])
        assert [row["status"] for row in rows.values()] == [DONE, DONE]
        assert len({row["sha256"] for row in rows.values()}) == 2
        for track_id in rows:
            assert fs.path("segments", track_id).exists() and fs.path("aggregated", track_id).exists()
    finally:
        fs.close()
