"""Embedding preprocessing: layer choice, centring, PCA (whitening), L2 normalisation, saved without pickle.

MERT track embeddings share a large common component, so raw cosine similarities all sit near 1; centring
removes it before any cosine-based comparison. A fitted transform is stored as one ``.npy`` (the mean and the
projection) and one ``.json`` (its config and the array's checksum), never as a pickle.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mess_ai.store.atomic import atomic_save_npy, atomic_write_bytes, load_npy
# The layer choice lives with the store's reader; the analysis modules import it from here too.
from mess_ai.store.layers import LAYER_MEAN, Layer, check_layer, parse_layer, select_layer  # noqa: F401

# Principal components with less variance than this fraction of the largest are numerical noise.
_RANK_TOLERANCE = 1e-10


def check_matrix(X: Any, min_samples: int = 1, what: str = "X") -> np.ndarray:
    """X as float64 [n_samples, n_features], finite, with at least ``min_samples`` rows; ValueError otherwise."""
    X = np.asarray(X)
    if X.ndim != 2:
        raise ValueError(f"{what} must be 2-D [n_samples, n_features]; got shape {list(X.shape)}")
    if not np.issubdtype(X.dtype, np.number) or np.issubdtype(X.dtype, np.complexfloating):
        raise ValueError(f"{what} must hold real numbers; got dtype {X.dtype}")
    if X.shape[0] < min_samples:
        raise ValueError(f"{what} has {X.shape[0]} samples; at least {min_samples} are needed")
    if X.shape[1] < 1:
        raise ValueError(f"{what} has 0 features")
    X = X.astype(np.float64, copy=False)
    bad_rows = np.flatnonzero(~np.isfinite(X).all(axis=1))
    if bad_rows.size:
        raise ValueError(f"{what} has non-finite values (NaN or inf) in {bad_rows.size} of {X.shape[0]} rows "
                         f"(first: row {bad_rows[0]})")
    return X


def check_features(features: Any, min_samples: int = 1) -> np.ndarray:
    """features as float64 X [n_tracks, n_features] or [n_tracks, n_layers, n_features], finite, with at least
    ``min_samples`` tracks; ValueError naming the shape, the layer and the row otherwise."""
    features = np.asarray(features)
    if features.ndim == 2:
        return check_matrix(features, min_samples, "features")
    if features.ndim != 3:
        raise ValueError(f"features must be [n_tracks, n_features] or [n_tracks, n_layers, n_features]; "
                         f"got shape {list(features.shape)}")
    if features.shape[1] < 1:
        raise ValueError("features have 0 layers")
    return np.stack([check_matrix(features[:, layer], min_samples, f"layer {layer} of features")
                     for layer in range(features.shape[1])], axis=1)


def l2_normalize(X: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length; an all-zero row stays zero (it has no direction, so similarity 0 to all)."""
    X = np.asarray(X, dtype=np.float64)
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    return np.divide(X, norms, out=np.zeros_like(X), where=norms > 0)


@dataclass(frozen=True)
class PreprocessConfig:
    """How vectors are prepared: centre, optionally project on ``n_components`` principal axes (``whiten``:
    scaled to unit variance), then L2-normalise."""

    center: bool = True
    whiten: bool = False
    n_components: int | None = None
    normalize: bool = True

    def __post_init__(self) -> None:
        if self.n_components is not None and self.n_components < 1:
            raise ValueError(f"n_components is {self.n_components}; it must be at least 1 (or None)")
        if self.whiten and not self.center:
            raise ValueError("whitening needs centring: whiten=True with center=False")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True, eq=False)
class FittedTransform:
    """A fitted preprocessing: ``mean`` float64 [n_features] (zeros without centring) and ``projection``
    float64 [n_features, n_components] (None when no PCA step)."""

    config: PreprocessConfig
    mean: np.ndarray
    projection: np.ndarray | None

    @property
    def n_features(self) -> int:
        return int(self.mean.shape[0])

    @property
    def n_outputs(self) -> int:
        return self.n_features if self.projection is None else int(self.projection.shape[1])

    def transform(self, X: np.ndarray) -> np.ndarray:
        """X [n_samples, n_features] -> float64 [n_samples, n_outputs]."""
        X = check_matrix(X)
        if X.shape[1] != self.n_features:
            raise ValueError(f"X has {X.shape[1]} features; the transform was fitted on {self.n_features}")
        Y = X - self.mean
        if self.projection is not None:
            Y = Y @ self.projection
        return l2_normalize(Y) if self.config.normalize else Y

    def save(self, stem: str | Path, meta: dict[str, Any] | None = None) -> tuple[Path, Path]:
        """Write ``<stem>.npy`` (row 0 the mean, rows 1.. the projection's columns) and then ``<stem>.json``.

        The JSON, written last, holds the array's SHA-256, so a half-replaced pair is detected on load.
        """
        stem = Path(stem)
        npy, meta_path = stem.with_name(stem.name + ".npy"), stem.with_name(stem.name + ".json")
        rows = [self.mean[None, :]] + ([] if self.projection is None else [self.projection.T])
        array = np.ascontiguousarray(np.concatenate(rows, axis=0), dtype=np.float64)
        atomic_save_npy(npy, array)
        record = {"config": self.config.to_dict(), "n_features": self.n_features,
                  "has_projection": self.projection is not None, "shape": list(array.shape),
                  "sha256": hashlib.sha256(npy.read_bytes()).hexdigest(), "meta": meta or {}}
        atomic_write_bytes(meta_path, (json.dumps(record, indent=2, sort_keys=True) + "\n").encode("utf-8"))
        return npy, meta_path

    @classmethod
    def load(cls, stem: str | Path) -> tuple[FittedTransform, dict[str, Any]]:
        """Read a transform written by ``save``; returns it and the ``meta`` saved with it.

        Raises FileNotFoundError when a file is missing and ValueError when the pair does not match.
        """
        stem = Path(stem)
        npy, meta_path = stem.with_name(stem.name + ".npy"), stem.with_name(stem.name + ".json")
        record = json.loads(meta_path.read_text(encoding="utf-8"))
        data = npy.read_bytes()
        if hashlib.sha256(data).hexdigest() != record["sha256"]:
            raise ValueError(f"{npy} does not match the checksum in {meta_path}")
        array = load_npy(npy)
        if list(array.shape) != record["shape"] or array.dtype != np.float64:
            raise ValueError(f"{npy} has shape {list(array.shape)} {array.dtype}; {meta_path} says {record['shape']}")
        config = PreprocessConfig(**record["config"])
        projection = array[1:].T.copy() if record["has_projection"] else None
        return cls(config, array[0].copy(), projection), record["meta"]


def fit_transform(X: np.ndarray, config: PreprocessConfig = PreprocessConfig()) -> FittedTransform:
    """Fit the preprocessing on X [n_samples, n_features]."""
    X = check_matrix(X, min_samples=2 if config.whiten else 1)
    n, d = X.shape
    mean = X.mean(axis=0) if config.center else np.zeros(d)
    projection = None
    if config.whiten or config.n_components is not None:
        # SVD of the centred data: its right singular vectors are the principal axes.
        _, singular, vt = np.linalg.svd(X - mean, full_matrices=False)
        variance = singular ** 2 / max(n - 1, 1)
        rank = int(np.sum(variance > _RANK_TOLERANCE * max(variance[0], np.finfo(float).tiny)))
        k = rank if config.n_components is None else config.n_components
        if k > rank:
            raise ValueError(f"n_components is {k} but the data has only {rank} non-degenerate principal "
                             f"components ({n} samples, {d} features)")
        if rank == 0:
            raise ValueError(f"all {n} samples are identical: there is no variance to whiten")
        axes = vt[:k]
        # A deterministic sign per axis (largest loading positive), so refits give the same transform.
        axes = axes * np.sign(axes[np.arange(k), np.argmax(np.abs(axes), axis=1)])[:, None]
        projection = axes.T
        if config.whiten:
            projection = projection / np.sqrt(variance[:k])
    return FittedTransform(config, mean, projection)
