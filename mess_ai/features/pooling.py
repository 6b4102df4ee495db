"""Pooling statistics over a track's segments, for analysis.

The stored ``aggregated`` scale is always the mean; these are the other summaries older recipes offered,
computed on demand from ``segments`` (float32 [n_windows, n_states, hidden]).
"""

from __future__ import annotations

import numpy as np

STATISTICS = ("mean", "max", "std", "mean_std")


def pool_segments(segments: np.ndarray, statistic: str = "mean") -> np.ndarray:
    """Pool over windows: segments [n_windows, n_states, hidden] -> [n_states, hidden] ([n_states, 2*hidden] for
    ``mean_std``, the mean followed by the standard deviation). One window has a standard deviation of 0."""
    if statistic not in STATISTICS:
        raise ValueError(f"unknown pooling statistic {statistic!r}; choose one of {', '.join(STATISTICS)}")
    segments = np.asarray(segments)
    if segments.ndim != 3 or segments.shape[0] == 0:
        raise ValueError(f"segments must be [n_windows >= 1, n_states, hidden]; got shape {list(segments.shape)}")
    values = segments.astype(np.float64)
    if statistic == "mean":
        pooled = values.mean(axis=0)
    elif statistic == "max":
        pooled = values.max(axis=0)
    elif statistic == "std":
        pooled = values.std(axis=0)
    else:
        pooled = np.concatenate([values.mean(axis=0), values.std(axis=0)], axis=-1)
    return pooled.astype(np.float32)
