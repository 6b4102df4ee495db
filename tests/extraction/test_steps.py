"""What a run reads of the manifest per file and per chunk: the rows of the files asked about, whatever the size of
the dataset (``file_states``, behind ``ExtractionSession.plan`` and ``still_pending``)."""

from __future__ import annotations

import contextlib
from typing import Iterator

from sqlalchemy import event, insert

from mess_ai.audio import discover_audio
from mess_ai.config import ExtractConfig
from mess_ai.pipeline import ExtractionSession, run_extraction
from mess_ai.store import Manifest
from mess_ai.store.manifest import tracks
from tests.helpers.audio import write_audio

OTHER_TRACKS = 2000


@contextlib.contextmanager
def rows_returned(manifest: Manifest) -> Iterator[list[tuple]]:
    """Every row SQLite hands to Python while the block runs (a row factory on each new connection)."""
    rows: list[tuple] = []

    def count(cursor, row):
        rows.append(row)
        return row

    def on_connect(dbapi_connection, _record):
        dbapi_connection.row_factory = count

    event.listen(manifest.engine, "connect", on_connect)
    manifest.engine.dispose()  # connections opened from here on count
    try:
        yield rows
    finally:
        event.remove(manifest.engine, "connect", on_connect)
        manifest.engine.dispose()


def test_still_pending_reads_the_rows_of_its_files_only(tmp_path, tiny_model):
    audio, store = tmp_path / "audio", tmp_path / "store"
    write_audio(audio / "a.wav", seconds=2.0)
    write_audio(audio / "b.wav", seconds=2.0, frequency=300)
    config = ExtractConfig(model=tiny_model, device="cpu")
    assert run_extraction(audio, store, config=config).done == 2
    session = ExtractionSession(store, "audio", config)
    try:
        manifest = session.store.manifest
        done = manifest.get("audio", discover_audio(audio)[0].track_id)
        with manifest.engine.begin() as conn:  # a big dataset: 2,000 more done tracks
            conn.execute(insert(tracks), [{**done, "track_id": f"other{i:04d}", "relative_path": f"other{i}.wav"}
                                          for i in range(OTHER_TRACKS)])
        sources = discover_audio(audio)
        with rows_returned(manifest) as rows:
            assert session.still_pending(sources) == []  # both done, their files in place
        assert sorted(row[0] for row in rows) == sorted(s.track_id for s in sources)
        with rows_returned(manifest) as rows:
            assert session.still_pending(sources[:1]) == []
        assert len(rows) == 1
    finally:
        session.close()
