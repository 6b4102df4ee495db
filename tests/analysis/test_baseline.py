"""The MFCC + chroma baseline separates pitch classes and noise, and is cached per track by content."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from mess_ai.analysis import baseline as baseline_module
from mess_ai.analysis.baseline import (
    BaselineConfig,
    baseline_features,
    dataset_baseline,
    feature_names,
    file_baseline_features,
)
from mess_ai.analysis.embedding_analyzer import EmbeddingAnalyzer
from mess_ai.analysis.loading import read_tracks
from tests.analysis.conftest import SAMPLE_RATE, write_tone_folder


def standardise(B):
    std = B.std(axis=0)
    return (B - B.mean(axis=0)) / np.where(std > 0, std, 1.0)


def test_pitch_classes_and_noise_bursts_are_separated(tmp_path):
    classes = write_tone_folder(tmp_path)
    B = np.stack([file_baseline_features(tmp_path / relative) for relative in classes])
    assert B.shape == (12, 64) and B.dtype == np.float32 and np.isfinite(B).all()
    analysis = EmbeddingAnalyzer(random_state=0).analyze(standardise(B))
    assert analysis.n_clusters == 4
    assert adjusted_rand_score(list(classes.values()), analysis.clusters) >= 0.9


def test_feature_layout_and_bad_signals():
    config = BaselineConfig(n_mfcc=13)
    assert len(feature_names(config)) == config.n_features == 50
    assert feature_names(config)[0] == "mfcc0_mean" and feature_names(config)[-1] == "chroma11_std"
    silence = baseline_features(np.zeros(SAMPLE_RATE, dtype=np.float32), SAMPLE_RATE, config)
    assert silence.shape == (50,) and np.isfinite(silence).all()
    with pytest.raises(ValueError, match=r"signal has 300 samples; the baseline needs at least n_fft = 2048"):
        baseline_features(np.ones(300), SAMPLE_RATE)
    with pytest.raises(ValueError, match="signal is at 16000 Hz; the config expects 22050 Hz"):
        baseline_features(np.zeros(1000), 16000)
    with pytest.raises(ValueError, match=r"non-empty 1-D mono array; got shape \[0\]"):
        baseline_features(np.zeros(0), SAMPLE_RATE)
    with pytest.raises(ValueError, match="non-finite"):
        baseline_features(np.r_[np.zeros(SAMPLE_RATE), np.nan], SAMPLE_RATE)
    with pytest.raises(ValueError, match="hop_length is 0"):
        BaselineConfig(hop_length=0)


def test_dataset_baseline_is_cached_and_skips_missing_sources(tone_store, tmp_path, monkeypatch):
    store, dataset, _ = tone_store
    _, tracks, _ = read_tracks(store, dataset)
    dataset_dir = tmp_path / "copy"  # a cache folder of this test's own; the store is shared
    found, B, skipped = dataset_baseline(dataset_dir, tracks)
    assert found == list(range(len(tracks))) and B.shape == (12, 64) and skipped == []
    assert len(list((dataset_dir / "baseline").glob("*.npy"))) == 12

    def refuse(*args, **kwargs):
        raise AssertionError("decoded although the cache holds these bytes")

    monkeypatch.setattr(baseline_module, "file_baseline_features", refuse)
    found_again, B_again, _ = dataset_baseline(dataset_dir, tracks)
    assert found_again == found and np.array_equal(B, B_again)

    monkeypatch.undo()
    moved = dataclasses.replace(tracks[0], source_path=str(tmp_path / "gone.wav"), sha256="0" * 64)
    found, B, skipped = dataset_baseline(dataset_dir, [moved, *tracks[1:]])
    assert found == list(range(1, 12)) and skipped[0]["track_id"] == moved.track_id
    assert "gone.wav" in skipped[0]["reason"]
