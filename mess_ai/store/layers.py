"""Which hidden states of stored features a reader wants: one index, the mean over all of them, or all of them."""

from __future__ import annotations

from typing import Sequence, Union

import numpy as np

LAYER_MEAN = "mean"
LAYER_ALL = "all"
Layer = Union[int, str]


def _choices(words: Sequence[str]) -> str:
    """'an integer hidden-state index or 'mean'', 'an integer hidden-state index, 'mean' or 'all''."""
    named = [repr(word) for word in words]
    return ", ".join(["an integer hidden-state index", *named[:-1]]) + f" or {named[-1]}"


def parse_layer(text: str, words: Sequence[str] = (LAYER_MEAN,)) -> Layer:
    """One of ``words`` or an integer hidden-state index, from a command-line string."""
    if text in words:
        return text
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"layer must be {_choices(words)}; got {text!r}") from None


def check_layer(layer: Layer, n_states: int | None, words: Sequence[str] = (LAYER_MEAN,)) -> Layer:
    """The layer as a non-negative index (negative counts from the end) or one of ``words``; ValueError when out of
    range or not a layer at all. ``n_states`` None (no features to check against): an index is taken as it is."""
    if isinstance(layer, str) and layer in words:
        return layer
    if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)):
        raise ValueError(f"layer must be {_choices(words)}; got {layer!r}")
    if n_states is None:
        return int(layer)
    if not -n_states <= layer < n_states:
        raise ValueError(f"layer {layer} is out of range: the features have {n_states} hidden states "
                         f"(valid: 0 to {n_states - 1}, negative from the end, or {' or '.join(map(repr, words))})")
    return int(layer) % n_states


def select_layer(features: np.ndarray, layer: Layer) -> np.ndarray:
    """features: [..., n_states, hidden] -> [..., hidden]: one hidden state, or the mean over all of them."""
    features = np.asarray(features)
    if features.ndim < 2:
        raise ValueError(f"features must be [..., n_states, hidden]; got shape {list(features.shape)}")
    layer = check_layer(layer, features.shape[-2])
    if layer == LAYER_MEAN:
        return features.mean(axis=-2, dtype=np.float64).astype(features.dtype, copy=False)
    return features[..., layer, :]
