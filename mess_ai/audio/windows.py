"""Cut a signal into equal-length, overlapping analysis windows."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class WindowSpec:
    """How a signal is cut: windows of ``window_seconds`` every ``hop_seconds``; shorter signals are refused."""

    window_seconds: float = 5.0
    hop_seconds: float = 2.5
    min_duration_seconds: float = 1.0

    def __post_init__(self) -> None:
        for name in ("window_seconds", "hop_seconds", "min_duration_seconds"):
            value = getattr(self, name)
            if not value > 0:
                raise ValueError(f"{name} must be positive, got {value}")
        if self.hop_seconds > self.window_seconds:
            # A hop longer than the window would leave parts of the signal in no window at all.
            raise ValueError(f"hop_seconds ({self.hop_seconds}) must not exceed window_seconds "
                             f"({self.window_seconds})")

    def to_dict(self) -> dict[str, float]:
        """The spec as plain numbers, to be written next to the windows it produced."""
        return asdict(self)


def window_bounds(n_samples: int, sample_rate: int, spec: WindowSpec) -> list[tuple[int, int]]:
    """The (start, length) of every window over a signal of ``n_samples`` at ``sample_rate``.

    Windows of ``round(window_seconds * sample_rate)`` samples start at 0, hop, 2*hop, ... while they fit; if the
    last of them stops short of the end, one more window is aligned to the end so the tail is covered. Every window
    then has the same length, which the model needs to batch them without padding. A signal shorter than one window
    (but not shorter than ``min_duration_seconds``) is one window of its own length.
    """
    if sample_rate <= 0:
        raise ValueError(f"sample_rate must be positive, got {sample_rate}")
    window = round(spec.window_seconds * sample_rate)
    hop = round(spec.hop_seconds * sample_rate)
    if hop < 1:
        raise ValueError(f"hop_seconds ({spec.hop_seconds}) is less than one sample at {sample_rate} Hz")
    min_samples = round(spec.min_duration_seconds * sample_rate)
    if n_samples < max(min_samples, 1):
        raise ValueError(f"signal too short: {n_samples} samples at {sample_rate} Hz, the minimum is "
                         f"{min_samples} samples ({spec.min_duration_seconds} s)")
    if n_samples <= window:
        return [(0, n_samples)]
    bounds = [(start, window) for start in range(0, n_samples - window + 1, hop)]
    if bounds[-1][0] + window < n_samples:
        bounds.append((n_samples - window, window))
    return bounds


def window_times(n_samples: int, sample_rate: int, spec: WindowSpec) -> np.ndarray:
    """The (start, end) in seconds of every window ``window_bounds`` cuts: float64 [n_windows, 2].

    The one rule for reporting where windows lie, as ``window_bounds`` is for cutting them: the last window is
    aligned to the end of the signal, so its start is not ``i * hop_seconds``, and it ends at ``n_samples /
    sample_rate``, the signal's duration."""
    bounds = np.asarray(window_bounds(n_samples, sample_rate, spec), dtype=np.float64)
    return np.column_stack([bounds[:, 0], bounds[:, 0] + bounds[:, 1]]) / sample_rate


def frame_windows(signal: np.ndarray, bounds: list[tuple[int, int]]) -> np.ndarray:
    """Copy the windows ``bounds`` of ``signal`` (float32 [n_samples]) into one [n_windows, length] array.

    A copy rather than a strided view: the tail window breaks the regular stride, and a copy owns its memory so it
    can be handed to a model or saved on its own.
    """
    if signal.ndim != 1:
        raise ValueError(f"signal must be one-dimensional, got shape {signal.shape}")
    if not bounds:
        raise ValueError("no windows to frame")
    lengths = sorted({length for _, length in bounds})
    if len(lengths) != 1:
        raise ValueError(f"windows must all have the same length, got lengths {lengths}")
    length = lengths[0]
    last_end = max(start for start, _ in bounds) + length
    if min(start for start, _ in bounds) < 0 or last_end > len(signal):
        raise ValueError(f"windows reach sample {last_end} of a signal of {len(signal)} samples")
    return np.stack([signal[start:start + length] for start, _ in bounds])
