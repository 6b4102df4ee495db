"""Tests of mess_ai.features.mert: MERT-v1 checkpoints load natively into HubertModel, exactly, or are refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import HubertModel

from mess_ai.errors import UnsupportedCheckpointError
from mess_ai.features.loading import load_model
from mess_ai.features.random_checkpoints import write_test_model


def _checkpoint(directory: Path) -> dict[str, torch.Tensor]:
    if (directory / "model.safetensors").is_file():
        return load_file(str(directory / "model.safetensors"))
    return torch.load(directory / "pytorch_model.bin", map_location="cpu", weights_only=True)


def _parametrized_name(key: str) -> str:
    return key.replace(".weight_g", ".parametrizations.weight.original0").replace(
        ".weight_v", ".parametrizations.weight.original1")


@pytest.mark.parametrize("weights_format", ["safetensors", "bin"])
def test_every_checkpoint_tensor_is_loaded_exactly(tmp_path: Path, weights_format: str) -> None:
    directory = write_test_model(tmp_path, seed=7, weights_format=weights_format)
    checkpoint = _checkpoint(directory)
    # MERT's legacy weight-norm names, which the loader must map onto the parametrization.
    assert {"encoder.pos_conv_embed.conv.weight_g", "encoder.pos_conv_embed.conv.weight_v"} <= checkpoint.keys()

    loaded = load_model(str(directory), device="cpu")

    state = loaded.model.state_dict()
    assert set(state) == {_parametrized_name(key) for key in checkpoint}
    for key, tensor in checkpoint.items():
        assert torch.equal(state[_parametrized_name(key)], tensor), key
    assert isinstance(loaded.model, HubertModel)
    assert not loaded.model.training
    assert all(parameter.dtype == torch.float32 for parameter in loaded.model.parameters())


@pytest.mark.parametrize("switch", ["feature_extractor_cqt", "deepnorm"])
def test_switches_hubert_cannot_reproduce_are_refused(tmp_path: Path, switch: str) -> None:
    directory = write_test_model(tmp_path, overrides={switch: True})

    with pytest.raises(UnsupportedCheckpointError) as caught:
        load_model(str(directory), device="cpu")

    assert switch in str(caught.value)
    assert str(directory / "config.json") in str(caught.value)


def test_attention_relax_is_accepted_because_it_leaves_the_softmax_unchanged(tmp_path: Path) -> None:
    directory = write_test_model(tmp_path, overrides={"attention_relax": 32.0})

    assert load_model(str(directory), device="cpu").num_hidden_states == 3


@pytest.mark.parametrize(("change", "expected"), [
    ("drop", "1 missing (encoder.layers.0.final_layer_norm.bias)"),
    ("add", "1 unexpected (encoder.layers.9.extra.weight)"),
])
def test_weights_that_do_not_fit_are_refused(tmp_path: Path, change: str, expected: str) -> None:
    directory = write_test_model(tmp_path)
    checkpoint = _checkpoint(directory)
    if change == "drop":
        del checkpoint["encoder.layers.0.final_layer_norm.bias"]
    else:
        checkpoint["encoder.layers.9.extra.weight"] = torch.zeros(3)
    save_file(checkpoint, str(directory / "model.safetensors"))

    with pytest.raises(UnsupportedCheckpointError, match=r"model\.safetensors") as caught:
        load_model(str(directory), device="cpu")

    assert expected in str(caught.value)


def test_weights_of_another_shape_are_refused(tmp_path: Path) -> None:
    # overrides change config.json only, so the weights keep the tiny shapes.
    directory = write_test_model(tmp_path, overrides={"intermediate_size": 48})

    with pytest.raises(UnsupportedCheckpointError, match="with another shape"):
        load_model(str(directory), device="cpu")


def test_weights_are_loaded_without_a_random_init_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    directory = write_test_model(tmp_path, seed=3)
    initialised = []
    original = HubertModel._init_weights
    monkeypatch.setattr(HubertModel, "_init_weights",
                        lambda self, module: initialised.append(type(module).__name__) or original(self, module))

    loaded = load_model(str(directory), device="cpu")

    assert initialised == []  # transformers' random init never ran: every weight is the checkpoint's
    assert not any(tensor.is_meta for tensor in loaded.model.state_dict().values())
    states = loaded.hidden_states(loaded.prepare(torch.randn(1, 24000)))
    assert states.shape == (1, 3, 74, 32) and torch.isfinite(states).all()
