"""Layer choice, centring, PCA whitening and L2 normalisation; a fitted transform round-trips through .npy/.json."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mess_ai.analysis.preprocessing import (
    FittedTransform,
    PreprocessConfig,
    check_layer,
    fit_transform,
    l2_normalize,
    parse_layer,
    select_layer,
)


def test_select_layer_index_negative_and_mean():
    features = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    assert np.array_equal(select_layer(features, 1), features[:, 1])
    assert np.array_equal(select_layer(features, -1), features[:, 2])
    assert np.allclose(select_layer(features, "mean"), features.mean(axis=1))
    with pytest.raises(ValueError, match=r"layer 3 is out of range: the features have 3 hidden states \(valid: 0 to 2"):
        select_layer(features, 3)
    assert check_layer(-3, 3) == 0 and parse_layer("mean") == "mean" and parse_layer("12") == 12
    with pytest.raises(ValueError, match="'last'"):
        parse_layer("last")


def test_whitening_gives_identity_covariance_and_normalising_unit_rows():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((200, 6)) @ rng.standard_normal((6, 10)) + 4.0  # rank 6 in 10 dimensions
    white = fit_transform(X, PreprocessConfig(whiten=True, normalize=False))
    Y = white.transform(X)
    assert Y.shape == (200, 6)
    assert np.allclose(np.cov(Y, rowvar=False), np.eye(6), atol=1e-8)
    unit = fit_transform(X).transform(X)
    assert np.allclose(np.linalg.norm(unit, axis=1), 1.0) and np.allclose(fit_transform(X).mean, X.mean(axis=0))
    with pytest.raises(ValueError, match="n_components is 8 but the data has only 6 non-degenerate"):
        fit_transform(X, PreprocessConfig(whiten=True, n_components=8))


def test_l2_normalize_leaves_zero_rows_zero():
    out = l2_normalize(np.array([[3.0, 4.0], [0.0, 0.0]]))
    assert np.allclose(out, [[0.6, 0.8], [0.0, 0.0]])


def test_transform_round_trips_without_pickle(tmp_path):
    X = np.random.default_rng(1).standard_normal((30, 8))
    fitted = fit_transform(X, PreprocessConfig(whiten=True, n_components=4))
    npy, meta = fitted.save(tmp_path / "t", meta={"key": "abc"})
    assert {p.name for p in tmp_path.iterdir()} == {"t.npy", "t.json"}
    assert np.load(npy, allow_pickle=False).shape == (5, 8)
    loaded, extra = FittedTransform.load(tmp_path / "t")
    assert extra == {"key": "abc"} and loaded.config == fitted.config
    assert np.allclose(loaded.transform(X), fitted.transform(X))

    record = json.loads(meta.read_text())
    np.save(npy, np.zeros((5, 8)), allow_pickle=False)  # replaced behind the JSON's back
    with pytest.raises(ValueError, match="does not match the checksum"):
        FittedTransform.load(tmp_path / "t")
    assert record["sha256"]


def test_transform_refuses_other_dimensions_and_bad_config():
    fitted = fit_transform(np.random.default_rng(2).standard_normal((10, 5)))
    with pytest.raises(ValueError, match="X has 3 features; the transform was fitted on 5"):
        fitted.transform(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="n_components is 0"):
        PreprocessConfig(n_components=0)
    with pytest.raises(ValueError, match="all 4 samples are identical"):
        fit_transform(np.ones((4, 3)), PreprocessConfig(whiten=True))
