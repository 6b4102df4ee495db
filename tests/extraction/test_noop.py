"""nothing_new: the read-only plan `mess-ai extract` makes before starting a flow run says "nothing to do" exactly
when a run would settle every file without work, and leaves every other case to the run."""

from __future__ import annotations

import dataclasses

from mess_ai.config import ExtractConfig
from mess_ai.extraction.noop import nothing_new
from mess_ai.pipeline import run_extraction
from tests.helpers.audio import write_audio, write_not_audio


def test_nothing_new_only_when_a_run_would_settle_every_file_without_work(tmp_path, tiny_model):
    audio, store = tmp_path / "audio", tmp_path / "store"
    config = ExtractConfig(model=tiny_model, device="cpu")
    write_audio(audio / "a.wav", seconds=2.0)
    write_audio(audio / "b.wav", seconds=2.0, frequency=300)
    write_not_audio(audio / "bad.wav")
    assert nothing_new(audio, store, "audio", config) is None  # no store yet: nothing created either
    assert not store.exists()
    assert run_extraction(audio, store, config=config).done == 2

    preview = nothing_new(audio, store, "audio", config)
    rerun = run_extraction(audio, store, config=config)  # what the run itself finds: the same, file by file
    assert preview is not None and not preview.model_loaded and preview.exit_code == rerun.exit_code == 1
    assert preview.counts == rerun.counts and (preview.unchanged, preview.previously_failed) == (2, 1)
    assert [dataclasses.asdict(o) for o in preview.outcomes] == [dataclasses.asdict(o) for o in rerun.outcomes]
    assert nothing_new(audio, store, "audio", config, only_failed=True) is None  # bad.wav would be retried

    assert nothing_new(audio, store, "audio", config.model_copy(update={"hop_seconds": 1.0})) is None
    assert nothing_new(audio, store, "other", config) is None
    temp = store / "audio" / "segments" / ".x.npy.tmp-1-abcd"  # left by a killed run: the run sweeps it
    temp.write_bytes(b"half")
    assert nothing_new(audio, store, "audio", config) is None
    temp.unlink()
    write_audio(audio / "b.wav", seconds=3.0, frequency=300)  # changed bytes
    assert nothing_new(audio, store, "audio", config) is None
