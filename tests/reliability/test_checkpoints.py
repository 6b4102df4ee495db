"""A corrupt checkpoint, or one of the wrong architecture: a clear error before any file is touched (no manifest
row, no feature file, no provenance)."""

from __future__ import annotations

import json
import pickle

import pytest

from mess_ai.errors import ModelError, UnsupportedCheckpointError
from mess_ai.features.loading import clear_model_cache
from mess_ai.features.random_checkpoints import write_test_model
from mess_ai.config import ExtractConfig
from mess_ai.pipeline import run_extraction
from mess_ai.store import FeatureStore
from tests.helpers.audio import write_audio, write_empty
from tests.helpers.flows import extract_flow


class _RunsCode:
    """Unpickling this runs ``open(marker, 'w')``: what a booby-trapped pytorch_model.bin would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _truncate_weights(model):
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


def _garbage_weights(model):
    (model / "model.safetensors").write_bytes(b"\x00" * 4096)


def _config_not_json(model):
    (model / "config.json").write_text("{ this is not json")


def _config_other_sizes(model):
    config = json.loads((model / "config.json").read_text())
    config["hidden_size"] = 64  # weights of a width-32 model under a width-64 config
    (model / "config.json").write_text(json.dumps(config))


def _weights_missing_a_layer(model):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(model / "model.safetensors"))
    save_file({k: v for k, v in tensors.items() if ".layers.1." not in k}, str(model / "model.safetensors"))


CORRUPT = {
    "truncated weights": (_truncate_weights, "cannot read the weights"),
    "weights are zeros": (_garbage_weights, "cannot read the weights"),
    "config.json is not JSON": (_config_not_json, "cannot be read as JSON"),
}
WRONG_ARCHITECTURE = {
    "config says width 64, weights are width 32": (_config_other_sizes, "with another shape"),
    "a transformer layer missing": (_weights_missing_a_layer, "missing"),
}


def _folder(tmp_path, with_bad_file=False):
    audio = tmp_path / "audio"
    for i in range(3):
        write_audio(audio / f"t{i}.wav", seconds=3.0, seed=i)
    if with_bad_file:
        write_empty(audio / "empty.wav")
    return audio


def _assert_untouched(store, dataset="audio"):
    """No manifest row, no feature file, no provenance: the store is as it was before the run."""
    fs = FeatureStore(store, dataset)
    try:
        assert fs.manifest.rows() == []
        assert fs.read_provenance() is None
    finally:
        fs.close()
    assert not [p for p in store.rglob("*.npy")]


@pytest.fixture(autouse=True)
def _fresh_model_cache():
    clear_model_cache()
    yield
    clear_model_cache()


@pytest.mark.parametrize("damage", list(CORRUPT) + list(WRONG_ARCHITECTURE))
def test_bad_checkpoint_is_refused_before_any_file_is_touched(tmp_path, damage):
    spoil, words = {**CORRUPT, **WRONG_ARCHITECTURE}[damage]
    model = write_test_model(tmp_path / "model")
    spoil(model)
    audio = _folder(tmp_path)
    with pytest.raises(UnsupportedCheckpointError) as raised:
        run_extraction(audio, tmp_path / "store", config=ExtractConfig(model=str(model), device="cpu"))
    assert str(model) in str(raised.value) and words in str(raised.value)
    _assert_untouched(tmp_path / "store")


@pytest.mark.parametrize("switch", ["deepnorm", "feature_extractor_cqt"])
def test_mert_switch_the_native_loader_cannot_reproduce_is_refused(tmp_path, switch):
    model = write_test_model(tmp_path / "model", overrides={switch: True})
    with pytest.raises(UnsupportedCheckpointError, match=switch):
        run_extraction(_folder(tmp_path), tmp_path / "store", config=ExtractConfig(model=str(model), device="cpu"))
    _assert_untouched(tmp_path / "store")


def test_booby_trapped_pickle_checkpoint_is_refused_without_running_it(tmp_path):
    model = write_test_model(tmp_path / "model", weights_format="bin")
    marker = tmp_path / "pwned"
    with open(model / "pytorch_model.bin", "wb") as fh:
        pickle.dump({"encoder.layer_norm.weight": _RunsCode(marker)}, fh)
    with pytest.raises(UnsupportedCheckpointError, match="cannot read the weights"):
        run_extraction(_folder(tmp_path), tmp_path / "store", config=ExtractConfig(model=str(model), device="cpu"))
    assert not marker.exists(), "unpickling the checkpoint ran its code"
    _assert_untouched(tmp_path / "store")


@pytest.mark.usefixtures("prefect_api")
def test_bad_checkpoint_fails_the_flow_before_any_file_is_touched(tmp_path):

    model = write_test_model(tmp_path / "model")
    _truncate_weights(model)
    state = extract_flow(audio_dir=str(_folder(tmp_path)), store=str(tmp_path / "store"), model=str(model),
                        device="cpu", gpu_limit="", return_state=True)
    assert state.is_failed()
    with pytest.raises(UnsupportedCheckpointError):
        state.result()
    _assert_untouched(tmp_path / "store")


def test_bad_checkpoint_writes_no_row_even_for_invalid_files(tmp_path):
    model = write_test_model(tmp_path / "model")
    _truncate_weights(model)
    with pytest.raises(UnsupportedCheckpointError):
        run_extraction(_folder(tmp_path, with_bad_file=True), tmp_path / "store",
                       config=ExtractConfig(model=str(model), device="cpu"))
    _assert_untouched(tmp_path / "store")


def test_checkpoint_of_a_text_model_is_refused(tmp_path):
    from transformers import BertConfig, BertModel

    model = tmp_path / "bert"
    BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                         vocab_size=100)).save_pretrained(model)
    (model / "preprocessor_config.json").write_text(json.dumps({"sampling_rate": 24000}))
    with pytest.raises(ModelError):
        run_extraction(_folder(tmp_path), tmp_path / "store", config=ExtractConfig(model=str(model), device="cpu"))
    _assert_untouched(tmp_path / "store")
