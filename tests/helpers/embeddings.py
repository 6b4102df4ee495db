"""Embeddings with planted structure, and feature stores holding them, for the analysis tests.

A store is written through the real ``FeatureStore`` and manifest calls the pipeline uses, with each track's
"sha256" derived from its array, so changing a track's features changes the dataset's content key as new audio
bytes would.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from mess_ai.store import FeatureStore

CONFIG_KEY = "planted-config"


def planted_blobs(n_per_blob: int, n_blobs: int, dim: int = 32, spread: float = 0.3, seed: int = 0
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian blobs around random centres of norm about 10: X float64 [n_per_blob * n_blobs, dim], labels int."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_blobs, dim)) * 10 / np.sqrt(dim)
    labels = np.repeat(np.arange(n_blobs), n_per_blob)
    X = centres[labels] + spread * rng.standard_normal((len(labels), dim)) / np.sqrt(dim) * 10
    return X, labels


def equal_axes(k: int, dim: int, n_rows: int | None = None, seed: int = 0) -> np.ndarray:
    """float64 [n_rows, dim] (n_rows: 2 k + 2 by default) with mean 0 and the same variance along each of the first k
    coordinates, none along the others: its explained variance ratios are exactly 1/k, k times."""
    n_rows = n_rows or 2 * k + 2
    if not 1 <= k <= min(n_rows - 1, dim):
        raise ValueError(f"k is {k}; valid values are 1 to min(n_rows - 1, dim) = {min(n_rows - 1, dim)}")
    rng = np.random.default_rng(seed)
    # Orthonormal columns orthogonal to the all-ones vector: zero-mean columns with equal, uncorrelated variance.
    q, _ = np.linalg.qr(np.column_stack([np.ones(n_rows), rng.standard_normal((n_rows, k))]))
    X = np.zeros((n_rows, dim))
    X[:, :k] = q[:, 1:] * np.sqrt(n_rows)
    return X


def layered(vectors: np.ndarray, n_states: int = 3, seed: int = 0) -> np.ndarray:
    """Stack track vectors [n, hidden] into aggregated features float32 [n, n_states, hidden]: every hidden state
    is the vector plus a shared offset (the common component real embeddings have) and a little noise."""
    rng = np.random.default_rng(seed)
    n, hidden = vectors.shape
    offset = rng.standard_normal((n_states, hidden)) * 5
    noise = 0.01 * rng.standard_normal((n, n_states, hidden))
    return (vectors[:, None, :] + offset[None] + noise).astype(np.float32)


def write_store(store_root: str | Path, dataset: str, aggregated: dict[str, np.ndarray],
                relative_paths: dict[str, str] | None = None, source_paths: dict[str, str] | None = None) -> Path:
    """Write done tracks ``{track_id: float32 [n_states, hidden]}`` (one window each) and a provenance file;
    returns the dataset folder."""
    store = FeatureStore(store_root, dataset)
    try:
        first = next(iter(aggregated.values()))
        store.write_provenance({"model": "planted", "config_key": CONFIG_KEY,
                                "num_hidden_states": int(first.shape[0]), "hidden_size": int(first.shape[1])})
        for track_id, array in aggregated.items():
            array = np.asarray(array, dtype=np.float32)
            relative = (relative_paths or {}).get(track_id, f"{track_id}.wav")
            store.manifest.begin_attempt(dataset, track_id, source_path=(source_paths or {}).get(track_id, relative),
                                         relative_path=relative, size=None, mtime_ns=None,
                                         sha256=hashlib.sha256(array.tobytes()).hexdigest(), config_key=CONFIG_KEY)
            store.write_segments(track_id, array[None], array)
            store.manifest.mark_done(dataset, track_id, duration_seconds=5.0, n_windows=1, seconds_spent=0.0)
        return store.dataset_dir
    finally:
        store.close()
