"""Shared analysis fixtures: one folder of tones of three pitch classes plus noise bursts, extracted once."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mess_ai.config import ExtractConfig
from mess_ai.pipeline import run_extraction
from tests.helpers.audio import write_audio

SAMPLE_RATE = 22050
PITCH_CLASSES = {"A": 220.0, "C": 261.63, "E": 329.63}


def noise_bursts(seconds: float, sample_rate: int, seed: int) -> np.ndarray:
    """Gated white noise, float32 [n_samples, 1]."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    return (0.3 * rng.standard_normal(len(t)) * (np.sin(2 * np.pi * 2 * t) > 0.3)).astype(np.float32)[:, None]


def write_tone_folder(folder: Path) -> dict[str, str]:
    """Three takes of each pitch class (slightly detuned, different noise) and three noise-burst files:
    returns {relative path: class}."""
    classes = {}
    for name, frequency in PITCH_CLASSES.items():
        for take, detune in enumerate((1.0, 1.004, 0.996)):
            relative = f"tones/{name}{take}.wav"
            write_audio(folder / relative, seconds=3.0, sample_rate=SAMPLE_RATE, frequency=frequency * detune,
                        seed=take)
            classes[relative] = name
    for take in range(3):
        relative = f"noise/burst{take}.wav"
        write_audio(folder / relative, sample_rate=SAMPLE_RATE, data=noise_bursts(3.0, SAMPLE_RATE, take))
        classes[relative] = "noise"
    return classes


@pytest.fixture(scope="session")
def tone_store(tmp_path_factory, tiny_model):
    """(store root, dataset, {relative path: class}) after the real pipeline ran on the tone folder."""
    root = tmp_path_factory.mktemp("tone-store")
    classes = write_tone_folder(root / "audio")
    summary = run_extraction(root / "audio", root / "store", dataset="tones",
                             config=ExtractConfig(model=tiny_model, device="cpu"))
    assert summary.done == len(classes) and not summary.failures
    return root / "store", "tones", classes
