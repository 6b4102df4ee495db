"""Tests of mess_ai.features.model: MERT-v1 checkpoints load natively into HubertModel, exactly, or are refused."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub.constants
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import HubertModel, Wav2Vec2FeatureExtractor

from mess_ai.errors import ModelError, ModelUnavailableError, UnsupportedCheckpointError
from mess_ai.features.model import (
    DEFAULT_MODEL,
    LoadedModel,
    clear_model_cache,
    get_model,
    hubert_config,
    load_model,
    mert_config,
    model_fingerprint,
    resolve_device,
    write_test_model,
)
from tests.helpers.audio import tone

SAMPLE_RATE = 24000


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_test_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def tiny(tiny_dir: Path) -> LoadedModel:
    return load_model(str(tiny_dir), device="cpu")


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


def test_tiny_model_gives_374_frames_for_five_seconds(tiny: LoadedModel) -> None:
    window = torch.from_numpy(tone(5.0, SAMPLE_RATE, seed=0)[:, 0]).unsqueeze(0)

    states = tiny.hidden_states(tiny.prepare(window))

    assert states.shape == (1, 3, 374, 32)
    assert states.dtype == torch.float32
    assert torch.isfinite(states).all()
    assert (tiny.sampling_rate, tiny.do_normalize, tiny.num_hidden_states, tiny.hidden_size) == (24000, False, 3, 32)


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


@pytest.mark.parametrize("do_normalize", [True, False])
def test_prepare_equals_wav2vec2_feature_extractor(tiny: LoadedModel, tiny_dir: Path, do_normalize: bool) -> None:
    windows = [tone(1.0, SAMPLE_RATE, frequency=f, amplitude=a, seed=s)[:, 0] + offset
               for f, a, s, offset in [(220.0, 0.9, 1, 0.0), (440.0, 0.1, 2, 0.3), (3000.0, 0.5, 3, -0.2)]]
    extractor = Wav2Vec2FeatureExtractor.from_pretrained(str(tiny_dir), do_normalize=do_normalize)
    expected = extractor(windows, sampling_rate=SAMPLE_RATE, return_tensors="np")["input_values"]
    model = dataclasses.replace(tiny, do_normalize=do_normalize)

    prepared = model.prepare(torch.from_numpy(np.stack(windows)))

    assert prepared.dtype == torch.float32
    np.testing.assert_allclose(prepared.numpy(), expected, rtol=1e-5, atol=1e-5)


def test_prepare_wants_a_batch(tiny: LoadedModel) -> None:
    with pytest.raises(ValueError, match=r"\[batch, samples\]"):
        tiny.prepare(torch.zeros(24000))


def test_hidden_states_of_a_model_that_returns_none_raise(tiny: LoadedModel) -> None:
    class NoHiddenStates(torch.nn.Module):
        def forward(self, input_values: torch.Tensor, output_hidden_states: bool) -> SimpleNamespace:
            return SimpleNamespace(hidden_states=None)

    model = dataclasses.replace(tiny, model=NoHiddenStates())

    with pytest.raises(ModelError, match="no hidden states"):
        model.hidden_states(torch.zeros(1, 24000))


def test_get_model_loads_once_per_process(tiny_dir: Path) -> None:
    clear_model_cache()
    first = get_model(str(tiny_dir), device="cpu")

    assert get_model(str(tiny_dir), device="cpu") is first
    clear_model_cache()
    assert get_model(str(tiny_dir), device="cpu") is not first
    clear_model_cache()


def _rewrite_weights(directory: Path, seed: int) -> None:
    before = (directory / "model.safetensors").stat().st_mtime_ns
    write_test_model(directory, seed=seed)
    # A filesystem with coarse timestamps could give the rewrite the old mtime; a real replacement comes later.
    os.utime(directory / "model.safetensors", ns=(before + 10**9, before + 10**9))


def test_model_fingerprint_follows_the_files(tmp_path: Path) -> None:
    directory = write_test_model(tmp_path)
    first = model_fingerprint(str(directory))

    assert model_fingerprint(str(directory)) == first
    _rewrite_weights(directory, seed=1)
    second = model_fingerprint(str(directory))
    assert second != first
    write_test_model(directory, seed=1, overrides={"layer_norm_eps": 1e-6})
    assert model_fingerprint(str(directory)) not in (first, second)


def test_model_fingerprint_is_cheap_and_names_hub_commits(tiny_dir: Path) -> None:
    started = time.perf_counter()
    for _ in range(50):
        model_fingerprint(str(tiny_dir))

    assert (time.perf_counter() - started) / 50 < 0.005
    commit = "0123456789abcdef0123456789abcdef01234567"
    assert model_fingerprint(DEFAULT_MODEL, commit) == f"m-a-p/MERT-v1-95M@{commit}"  # the commit, not "main"


def test_get_model_reloads_a_changed_checkpoint(tmp_path: Path) -> None:
    directory = write_test_model(tmp_path)
    clear_model_cache()
    first = get_model(str(directory), device="cpu")

    _rewrite_weights(directory, seed=1)

    assert get_model(str(directory), device="cpu") is not first
    clear_model_cache()


def test_write_test_model_is_deterministic_and_small(tmp_path: Path) -> None:
    same = [write_test_model(tmp_path / name, seed=5) for name in ("a", "b")]
    other = write_test_model(tmp_path / "c", seed=6)

    weights = [(directory / "model.safetensors").read_bytes() for directory in (*same, other)]
    assert weights[0] == weights[1] != weights[2]
    assert sum(path.stat().st_size for path in same[0].iterdir()) < 1_000_000
    assert sorted(path.name for path in same[0].iterdir()) == ["config.json", "model.safetensors",
                                                              "preprocessor_config.json"]


def test_base_config_has_mert_v1_95m_values() -> None:
    config = mert_config("base")

    assert {key: config[key] for key in (
        "model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "conv_dim",
        "conv_kernel", "conv_stride", "conv_bias", "feat_extract_norm", "num_conv_pos_embeddings",
        "num_conv_pos_embedding_groups", "do_stable_layer_norm", "feat_proj_layer_norm", "feature_extractor_cqt",
        "feature_extractor_cqt_bins", "deepnorm", "attention_relax", "sample_rate")} == {
        "model_type": "mert_model", "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
        "intermediate_size": 3072, "conv_dim": [512] * 7, "conv_kernel": [10, 3, 3, 3, 3, 2, 2],
        "conv_stride": [5, 2, 2, 2, 2, 2, 2], "conv_bias": False, "feat_extract_norm": "group",
        "num_conv_pos_embeddings": 128, "num_conv_pos_embedding_groups": 16, "do_stable_layer_norm": False,
        "feat_proj_layer_norm": True, "feature_extractor_cqt": False, "feature_extractor_cqt_bins": 336,
        "deepnorm": False, "attention_relax": -1.0, "sample_rate": 24000}
    assert config["auto_map"] == {"AutoConfig": "configuration_MERT.MERTConfig",
                                  "AutoModel": "modeling_MERT.MERTModel"}
    with torch.device("meta"):
        model = HubertModel(hubert_config(config))
    assert sum(parameter.numel() for parameter in model.parameters()) == 94_371_712  # MERT-v1-95M


def test_tiny_config_keeps_mert_front_end() -> None:
    tiny, base = mert_config("tiny"), mert_config("base")

    assert (tiny["conv_kernel"], tiny["conv_stride"]) == (base["conv_kernel"], base["conv_stride"])
    with pytest.raises(ValueError, match="huge"):
        mert_config("huge")


def test_random_weights_are_announced(tiny_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="mess_ai.features.model"):
        load_model(str(tiny_dir), device="cpu")

    assert "RANDOM weights" in caplog.text


def test_other_model_types_load_through_automodel(tmp_path: Path) -> None:
    config = mert_config("tiny")
    HubertModel(hubert_config(config)).save_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"sampling_rate": 16000, "do_normalize": True}))

    loaded = load_model(str(tmp_path), device="cpu")

    assert (loaded.sampling_rate, loaded.do_normalize, loaded.num_hidden_states) == (16000, True, 3)
    assert loaded.hidden_states(loaded.prepare(torch.zeros(1, 16000) + 0.1)).shape == (1, 3, 49, 32)


def test_resolve_device() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    with pytest.raises(ValueError, match="tpu9"):
        resolve_device("tpu9")
    if not torch.cuda.is_available():
        with pytest.raises(ModelError, match="CUDA is not available"):
            resolve_device("cuda:1")
