import numpy as np
import pytest

from mess_ai.features.pooling import pool_segments


def test_statistics():
    segments = np.array([[[1.0, 2.0]], [[3.0, 6.0]]], dtype=np.float32)  # [2 windows, 1 state, 2 dims]
    assert pool_segments(segments).tolist() == [[2.0, 4.0]]
    assert pool_segments(segments, "max").tolist() == [[3.0, 6.0]]
    assert pool_segments(segments, "std").tolist() == [[1.0, 2.0]]
    assert pool_segments(segments, "mean_std").tolist() == [[2.0, 4.0, 1.0, 2.0]]
    assert pool_segments(segments[:1], "std").tolist() == [[0.0, 0.0]]
    assert pool_segments(segments).dtype == np.float32


def test_bad_input():
    with pytest.raises(ValueError, match="median"):
        pool_segments(np.zeros((1, 1, 1)), "median")
    with pytest.raises(ValueError, match=r"\[0, 3, 4\]"):
        pool_segments(np.zeros((0, 3, 4)))
    with pytest.raises(ValueError, match=r"\[3, 4\]"):
        pool_segments(np.zeros((3, 4)))
