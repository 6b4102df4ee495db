"""Checkpoints with RANDOM weights, for tests, demos and benchmarks that must run without network: ``write_test_model``
writes a checkpoint in MERT-v1's on-disk format (``mert_config`` for its shape) whose embeddings mean nothing. Its
``config.json`` carries a marker that makes loading it log a warning.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mess_ai.features.checkpoint import (
    CONFIG_FILE,
    PREPROCESSOR_FILE,
    RANDOM_WEIGHTS_MARKER,
    SAFETENSORS_FILE,
    TORCH_BIN_FILE,
)
from mess_ai.features.mert import MERT_MODEL_TYPE, WEIGHT_NORM_NAMES, hubert_config
from mess_ai.store.atomic import atomic_target, atomic_write_json

_TEST_MODEL_SIZES: dict[str, dict[str, Any]] = {
    "base": {
        "hidden_size": 768,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "intermediate_size": 3072,
        "conv_dim": [512] * 7,
        "num_conv_pos_embeddings": 128,
        "num_conv_pos_embedding_groups": 16,
    },
    # MERT's convolution kernels and strides are kept, so 5 s at 24 kHz still gives 374 frames.
    "tiny": {
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "conv_dim": [32] * 7,
        "num_conv_pos_embeddings": 16,
        "num_conv_pos_embedding_groups": 4,
    },
}


def mert_config(size: str = "tiny") -> dict[str, Any]:
    """``config.json`` of a MERT-v1 checkpoint: ``base`` has MERT-v1-95M's shape, ``tiny`` the same front end
    (75 frames/s at 24 kHz) with width 32 and 2 layers. The other values are MERT-v1-95M's."""
    if size not in _TEST_MODEL_SIZES:
        raise ValueError(f"Unknown test model size {size!r}; expected one of {sorted(_TEST_MODEL_SIZES)}.")
    return {
        "model_type": MERT_MODEL_TYPE,
        "architectures": ["MERTModel"],
        "auto_map": {"AutoConfig": "configuration_MERT.MERTConfig", "AutoModel": "modeling_MERT.MERTModel"},
        "feature_extractor_cqt": False,
        "feature_extractor_cqt_bins": 336,
        "deepnorm": False,
        "attention_relax": -1.0,
        "sample_rate": 24000,
        "vocab_size": 32,
        "hidden_act": "gelu",
        "hidden_dropout": 0.1,
        "activation_dropout": 0.1,
        "attention_dropout": 0.1,
        "feat_proj_layer_norm": True,
        "feat_proj_dropout": 0.0,
        "final_dropout": 0.1,
        "layerdrop": 0.1,
        "initializer_range": 0.02,
        "layer_norm_eps": 1e-5,
        "feat_extract_norm": "group",
        "feat_extract_activation": "gelu",
        "conv_stride": [5, 2, 2, 2, 2, 2, 2],
        "conv_kernel": [10, 3, 3, 3, 3, 2, 2],
        "conv_bias": False,
        "conv_pos_batch_norm": False,
        "num_feat_extract_layers": 7,
        "do_stable_layer_norm": False,
        "apply_spec_augment": True,
        "mask_time_prob": 0.05,
        "mask_time_length": 10,
        "mask_time_min_masks": 2,
        "mask_feature_prob": 0.0,
        "mask_feature_length": 10,
        "mask_feature_min_masks": 0,
        "use_weighted_layer_sum": False,
        "classifier_proj_size": 256,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "float32",
        **_TEST_MODEL_SIZES[size],
    }


def write_test_model(directory: str | Path, size: str = "tiny", seed: int = 0, weights_format: str = "safetensors",
                     overrides: dict[str, Any] | None = None) -> Path:
    """Write a MERT-v1-format checkpoint with RANDOM weights into ``directory``; returns the directory.

    The weights are random (deterministic for ``seed``): the model runs like MERT but its features mean nothing.
    Files: ``config.json`` (``mert_config(size)`` plus ``overrides`` and the random-weights marker),
    ``preprocessor_config.json``, and the weights under MERT's key names (legacy ``weight_g``/``weight_v``) as
    ``model.safetensors`` or, with ``weights_format="bin"``, ``pytorch_model.bin``. ``tiny`` is well under 1 MB;
    ``base`` is MERT-v1-95M's size (~380 MB).
    """
    if weights_format not in ("safetensors", "bin"):
        raise ValueError(f"Unknown weights_format {weights_format!r}; expected 'safetensors' or 'bin'.")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = {**mert_config(size), **(overrides or {}), RANDOM_WEIGHTS_MARKER: True}
    preprocessor = {
        "feature_extractor_type": "Wav2Vec2FeatureExtractor",
        "feature_size": 1,
        "sampling_rate": config["sample_rate"],
        "do_normalize": False,
        "padding_value": 0.0,
        "padding_side": "right",
        "return_attention_mask": True,
    }
    tensors = _random_mert_weights(mert_config(size), seed)
    atomic_write_json(directory / CONFIG_FILE, config)
    atomic_write_json(directory / PREPROCESSOR_FILE, preprocessor)
    if weights_format == "safetensors":
        from safetensors.torch import save_file

        with atomic_target(directory / SAFETENSORS_FILE) as temporary:
            save_file(tensors, str(temporary), metadata={"format": "pt"})
    else:
        with atomic_target(directory / TORCH_BIN_FILE) as temporary:
            torch.save(tensors, temporary)
    return directory


def _random_mert_weights(config: dict[str, Any], seed: int) -> dict[str, torch.Tensor]:
    """Random tensors under MERT-v1's key names for ``config``: float32, deterministic for ``seed``.

    The names and shapes come from a HubertModel built on the meta device (no memory, no init cost), with the
    weight-norm parametrization renamed back to the legacy ``weight_g``/``weight_v`` that MERT checkpoints store.
    Norm gains and weight-norm magnitudes sit around 1, matrices are scaled by 1/sqrt(fan_in), vectors around 0;
    no tensor equals a default initialisation, so a tensor the loader failed to copy shows.
    """
    from transformers import HubertModel

    legacy_names = {f"parametrizations.weight.{new}": old for old, new in WEIGHT_NORM_NAMES.items()}
    with torch.device("meta"):
        shapes = {key: tensor.shape for key, tensor in HubertModel(hubert_config(config)).state_dict().items()}
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for key in sorted(shapes):
        name = next((key.replace(new, old) for new, old in legacy_names.items() if key.endswith(new)), key)
        shape = shapes[key]
        noise = torch.randn(shape, generator=generator)
        if name.endswith(("layer_norm.weight", ".weight_g")):
            tensors[name] = 1.0 + 0.1 * noise
        else:
            # 1/sqrt(fan_in) keeps each layer's output on the scale of its input.
            tensors[name] = noise * (shape[1:].numel() ** -0.5 if len(shape) >= 2 else 0.1)
    return tensors
