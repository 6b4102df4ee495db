"""Tests of mess_ai.features.loading: a model loads once per process, from a directory or the hub cache, or the
error says what is missing and how to get it."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from transformers import HubertModel

from mess_ai.errors import ModelUnavailableError
from mess_ai.features.checkpoint import DEFAULT_MODEL
from mess_ai.features.loading import clear_model_cache, get_model, load_model
from mess_ai.features.mert import hubert_config
from mess_ai.features.random_checkpoints import mert_config, write_test_model


def test_offline_hub_id_names_model_revision_and_remedies(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    # huggingface_hub read both variables when it was imported; the calls read these module attributes.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))

    with pytest.raises(ModelUnavailableError) as caught:
        load_model(DEFAULT_MODEL, revision="v1.0", device="cpu")

    message = str(caught.value)
    assert "m-a-p/MERT-v1-95M (revision v1.0)" in message
    assert "hf download m-a-p/MERT-v1-95M --revision v1.0" in message
    assert "HF_HUB_OFFLINE=1" in message
    assert "--model /path/to/MERT-v1-95M" in message
    assert caught.value.__suppress_context__


def test_missing_local_directory_is_unavailable(tmp_path: Path) -> None:
    missing = tmp_path / "MERT-v1-95M"

    with pytest.raises(ModelUnavailableError, match="no such directory") as caught:
        load_model(str(missing), device="cpu")

    assert str(missing) in str(caught.value)


@pytest.mark.parametrize("name", ["model.safetensors", "preprocessor_config.json", "config.json"])
def test_local_directory_missing_a_file_is_unavailable(tmp_path: Path, name: str) -> None:
    directory = write_test_model(tmp_path)
    (directory / name).unlink()

    with pytest.raises(ModelUnavailableError, match="not available"):
        load_model(str(directory), device="cpu")


def test_get_model_loads_once_per_process(tiny_model: str) -> None:
    clear_model_cache()
    first = get_model(tiny_model, device="cpu")

    assert get_model(tiny_model, device="cpu") is first
    clear_model_cache()
    assert get_model(tiny_model, device="cpu") is not first
    clear_model_cache()


def test_random_weights_are_announced(tiny_model: str, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="mess_ai.features.loading"):
        load_model(tiny_model, device="cpu")

    assert "RANDOM weights" in caplog.text


def test_other_model_types_load_through_automodel(tmp_path: Path) -> None:
    config = mert_config("tiny")
    HubertModel(hubert_config(config)).save_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"sampling_rate": 16000, "do_normalize": True}))

    loaded = load_model(str(tmp_path), device="cpu")

    assert (loaded.sampling_rate, loaded.do_normalize, loaded.num_hidden_states) == (16000, True, 3)
    assert loaded.hidden_states(loaded.prepare(torch.zeros(1, 16000) + 0.1)).shape == (1, 3, 49, 32)
