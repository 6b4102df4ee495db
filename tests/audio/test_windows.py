"""window_bounds cuts any signal into equal-length windows plus an end-aligned tail; frame_windows stacks them."""

from __future__ import annotations

import numpy as np
import pytest

from mess_ai.audio import WindowSpec, frame_windows, window_bounds, window_times

# 10 samples per second keeps the expected bounds readable: windows of 50 samples every 25.
SR = 10
SPEC = WindowSpec(window_seconds=5.0, hop_seconds=2.5, min_duration_seconds=1.0)


@pytest.mark.parametrize(("n_samples", "expected"), [
    (100, [(0, 50), (25, 50), (50, 50)]),
    (110, [(0, 50), (25, 50), (50, 50), (60, 50)]),
    (51, [(0, 50), (1, 50)]),
    (75, [(0, 50), (25, 50)]),
    (50, [(0, 50)]),
    (30, [(0, 30)]),
    (10, [(0, 10)]),
])
def test_exact_bounds(n_samples, expected):
    assert window_bounds(n_samples, SR, SPEC) == expected


@pytest.mark.parametrize("n_samples", [51, 99, 100, 101, 1234, 100_000])
def test_windows_are_equal_length_and_cover_the_whole_signal(n_samples):
    bounds = window_bounds(n_samples, SR, SPEC)
    assert {length for _, length in bounds} == {50}
    covered = np.zeros(n_samples, dtype=bool)
    for start, length in bounds:
        covered[start:start + length] = True
    assert covered.all()
    assert bounds[-1][0] + bounds[-1][1] == n_samples


def test_window_times_are_the_bounds_in_seconds_and_the_last_ends_at_the_duration():
    # 110 samples: three windows on the hop, then one aligned to the end (start 6.0 s, not 7.5 s).
    np.testing.assert_array_equal(window_times(110, SR, SPEC), [[0.0, 5.0], [2.5, 7.5], [5.0, 10.0], [6.0, 11.0]])
    np.testing.assert_array_equal(window_times(30, SR, SPEC), [[0.0, 3.0]])  # shorter than a window: its own length
    times = window_times(24000 * 12 + 7, 24000, WindowSpec())
    assert times.dtype == np.float64 and times.shape == (4, 2)
    assert times[-1, 0] == 168007 / 24000 and times[-1, 1] == (24000 * 12 + 7) / 24000
    with pytest.raises(ValueError, match="9 samples at 10 Hz"):
        window_times(9, SR, SPEC)


def test_shorter_than_minimum_is_refused_with_the_numbers():
    with pytest.raises(ValueError, match="9 samples at 10 Hz, the minimum is 10 samples"):
        window_bounds(9, SR, SPEC)
    with pytest.raises(ValueError):
        window_bounds(0, SR, SPEC)


def test_default_spec_at_24_khz_gives_120000_sample_windows():
    bounds = window_bounds(24000 * 12, 24000, WindowSpec())
    assert {length for _, length in bounds} == {120000}
    assert [start for start, _ in bounds] == [0, 60000, 120000, 168000]


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"window_seconds": 0.0}, "window_seconds must be positive, got 0.0"),
    ({"hop_seconds": -1.0}, "hop_seconds must be positive, got -1.0"),
    ({"min_duration_seconds": 0.0}, "min_duration_seconds must be positive"),
    ({"window_seconds": 2.0, "hop_seconds": 3.0}, r"hop_seconds \(3.0\) must not exceed window_seconds \(2.0\)"),
])
def test_spec_rejects_bad_numbers(kwargs, message):
    with pytest.raises(ValueError, match=message):
        WindowSpec(**kwargs)


def test_spec_to_dict_round_trips():
    spec = WindowSpec(window_seconds=4.0, hop_seconds=1.0, min_duration_seconds=2.0)
    assert spec.to_dict() == {"window_seconds": 4.0, "hop_seconds": 1.0, "min_duration_seconds": 2.0}
    assert WindowSpec(**spec.to_dict()) == spec


def test_frame_windows_copies_each_window():
    signal = np.arange(110, dtype=np.float32)
    bounds = window_bounds(len(signal), SR, SPEC)
    frames = frame_windows(signal, bounds)
    assert frames.shape == (4, 50)
    assert frames.dtype == np.float32
    for row, (start, length) in zip(frames, bounds):
        np.testing.assert_array_equal(row, signal[start:start + length])
    frames[0, 0] = -1
    assert signal[0] == 0


def test_frame_windows_refuses_unequal_or_out_of_range_windows():
    signal = np.zeros(100, dtype=np.float32)
    with pytest.raises(ValueError, match="same length"):
        frame_windows(signal, [(0, 50), (60, 40)])
    with pytest.raises(ValueError, match="reach sample 110"):
        frame_windows(signal, [(60, 50)])
    with pytest.raises(ValueError, match="one-dimensional"):
        frame_windows(signal.reshape(10, 10), [(0, 5)])
