"""Tests of mess_ai.features.device: ``auto`` takes the best device present; an unusable one is refused."""

from __future__ import annotations

import pytest
import torch

from mess_ai.errors import ModelError
from mess_ai.features.device import resolve_device


def test_resolve_device() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    with pytest.raises(ValueError, match="tpu9"):
        resolve_device("tpu9")
    if not torch.cuda.is_available():
        with pytest.raises(ModelError, match="CUDA is not available"):
            resolve_device("cuda:1")
