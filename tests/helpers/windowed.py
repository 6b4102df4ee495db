"""A small folder of recordings whose lengths exercise every windowing case, extracted by the real pipeline with
the tiny model: the store the reader and export tests read."""

from __future__ import annotations

from pathlib import Path

from mess_ai.config import ExtractConfig
from mess_ai.pipeline import RunSummary, run_extraction
from mess_ai.store import DONE, FeatureStore
from tests.helpers.audio import write_audio

# Recorded at 22.05 kHz, so decoding resamples them (the tiny model's rate is 24 kHz): shorter than a window, one
# window exactly, a tail window, windows ending on the hop exactly, several windows and a tail.
DURATIONS = {"short.wav": 1.5, "one.wav": 5.0, "tail.wav": 6.3, "hop.wav": 10.0, "long/tail2.wav": 12.1}
# Shorter than the minimum duration: a failed row, which readers and exports leave out.
TOO_SHORT = "tooshort.wav"
SAMPLE_RATE = 22050
DATASET = "windowed"


def write_windowed_audio(folder: Path) -> None:
    for i, (relative, seconds) in enumerate(DURATIONS.items()):
        write_audio(folder / relative, seconds=seconds, sample_rate=SAMPLE_RATE, frequency=220.0 * (i + 1), seed=i)
    write_audio(folder / TOO_SHORT, seconds=0.4, sample_rate=SAMPLE_RATE)


def extract(audio: Path, store: Path, model: str, dataset: str = DATASET) -> RunSummary:
    return run_extraction(audio, store, dataset=dataset, config=ExtractConfig(model=model, device="cpu"))


def windowed_store(root: Path, model: str) -> Path:
    """``root/store`` after the pipeline ran on ``root/audio`` (the recordings above): every file done but the one
    too short."""
    write_windowed_audio(root / "audio")
    summary = extract(root / "audio", root / "store", model)
    assert summary.done == len(DURATIONS) and [f.relative_path for f in summary.failures] == [TOO_SHORT]
    return root / "store"


def done_rows(store: Path, dataset: str = DATASET) -> list[dict]:
    """The manifest's done rows of ``dataset``, sorted by relative path."""
    fs = FeatureStore(store, dataset)
    try:
        return fs.manifest.rows(dataset, DONE)
    finally:
        fs.close()
