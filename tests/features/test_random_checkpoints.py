"""Tests of mess_ai.features.random_checkpoints: small, deterministic MERT-v1-format checkpoints of MERT's shape."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import HubertModel

from mess_ai.features.mert import hubert_config
from mess_ai.features.random_checkpoints import mert_config, write_test_model


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
