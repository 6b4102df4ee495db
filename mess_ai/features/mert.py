"""MERT-v1 as transformers' ``HubertModel``: MERT-v1's own hub code breaks on transformers >= 4.48 (on 5.x it returns
no hidden states), so a checkpoint whose ``config.json`` says ``model_type: "mert_model"`` is mapped here onto
``HubertConfig`` and its weights into ``HubertModel``, which is MERT-v1 minus the CQT front end and DeepNorm. The load
is strict (every checkpoint tensor used, every parameter provided, shapes equal), so a checkpoint ``HubertModel``
cannot reproduce is refused instead of running with randomly initialised layers; the weights go straight into a
model built without any (no random init first). transformers and safetensors are imported inside the functions that
use them: importing transformers takes seconds.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mess_ai.errors import ModelUnavailableError, UnsupportedCheckpointError
from mess_ai.features.checkpoint import (
    CONFIG_FILE,
    SAFETENSORS_FILE,
    TORCH_BIN_FILE,
    first_line,
    unavailable_message,
)

if TYPE_CHECKING:
    import torch
    from transformers import HubertConfig

MERT_MODEL_TYPE = "mert_model"

# MERT config fields that have a HubertConfig field of the same name and meaning. A field absent from config.json
# falls back to HubertConfig's default, which equals MERTConfig's default for every field listed here.
_HUBERT_FIELDS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "hidden_act",
    "hidden_dropout",
    "activation_dropout",
    "attention_dropout",
    "feat_proj_layer_norm",
    "feat_proj_dropout",
    "final_dropout",
    "layerdrop",
    "initializer_range",
    "layer_norm_eps",
    "feat_extract_norm",
    "feat_extract_activation",
    "conv_dim",
    "conv_stride",
    "conv_kernel",
    "conv_bias",
    "num_conv_pos_embeddings",
    "num_conv_pos_embedding_groups",
    "conv_pos_batch_norm",
    "do_stable_layer_norm",
    "apply_spec_augment",
    "mask_time_prob",
    "mask_time_length",
    "mask_time_min_masks",
    "mask_feature_prob",
    "mask_feature_length",
    "mask_feature_min_masks",
)

# MERT switches HubertModel has no equivalent for. DeepNorm keeps every parameter name and shape, so only this check
# catches it; CQT features would also fail the strict key check, but this says why. MERT's `attention_relax` is not
# here: MERT reads it only inside its DeepNorm encoder, and even there it subtracts each row's maximum logit before
# the softmax, which leaves the softmax unchanged.
_REFUSED_SWITCHES = {
    "feature_extractor_cqt": "MERT then appends CQT features to the convolutional features, which HubertModel "
                             "cannot compute",
    "deepnorm": "MERT then scales every residual connection (DeepNorm), which HubertModel does not do",
}

# torch's weight_norm parametrization names for the legacy `weight_g` / `weight_v` tensors MERT checkpoints store.
WEIGHT_NORM_NAMES = {"weight_g": "original0", "weight_v": "original1"}


def hubert_config(mert: dict[str, Any]) -> HubertConfig:
    """The transformers ``HubertConfig`` equivalent to a MERT-v1 ``config.json`` (the MERT-only fields dropped)."""
    from transformers import HubertConfig

    return HubertConfig(**{field: mert[field] for field in _HUBERT_FIELDS if field in mert})


def load_mert(source_dir: Path, config: dict[str, Any], name_or_path: str, revision: str | None) -> torch.nn.Module:
    """A MERT-v1 checkpoint as transformers' HubertModel, refusing anything HubertModel would compute differently."""
    import torch
    from transformers import HubertModel

    config_path = source_dir / CONFIG_FILE
    for switch, why in _REFUSED_SWITCHES.items():
        if config.get(switch):
            raise UnsupportedCheckpointError(f"{config_path}: {switch} is {json.dumps(config[switch])}; {why}, so "
                                             f"this checkpoint cannot be loaded without MERT's own code.")
    weights_path = next((path for path in (source_dir / SAFETENSORS_FILE, source_dir / TORCH_BIN_FILE)
                         if path.is_file()), None)
    if weights_path is None:
        raise ModelUnavailableError(unavailable_message(
            name_or_path, revision, f"{source_dir} has neither {SAFETENSORS_FILE} nor {TORCH_BIN_FILE}"))
    try:
        hubert = hubert_config(config)
    except (TypeError, ValueError) as exc:
        raise UnsupportedCheckpointError(f"{config_path}: not a valid HuBERT configuration ({first_line(exc)}).") \
            from None
    # Built on the meta device: no memory for the weights and no random init (transformers skips initialising on
    # meta), which for MERT-v1-95M took longer than reading its weights. The checkpoint's tensors are then assigned
    # as they are, not copied into weights initialised for nothing.
    with torch.device("meta"):
        model = HubertModel(hubert)
    expected = model.state_dict()
    state = _rename_weight_norm(_read_weights(weights_path), expected.keys())
    _check_weights_fit(state, expected, weights_path)
    model.load_state_dict(state, strict=True, assign=True)
    unset = [name for name, tensor in (*model.named_parameters(), *model.named_buffers()) if tensor.is_meta]
    if unset:  # a tensor the model keeps outside its state dict: the checkpoint cannot give it a value
        raise UnsupportedCheckpointError(f"{weights_path}: HubertModel has tensors no checkpoint sets "
                                         f"({_preview(unset)}); this transformers version cannot load MERT-v1.")
    return model


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` or ``pytorch_model.bin`` file, by name, on the CPU."""
    import torch

    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            # Copied out of the file's memory map: the model's weights must be this process's own, not pages of
            # a file that may be rewritten under a running model (read lazily, they would also only be counted,
            # and paid for, at the first forward pass).
            state = {name: tensor.clone() for name, tensor in load_file(str(path), device="cpu").items()}
        else:
            # weights_only: a checkpoint is data, and plain unpickling would run whatever code the file holds.
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # safetensors, pickle and zip each raise their own errors for a damaged file
        raise UnsupportedCheckpointError(f"{path}: cannot read the weights ({first_line(exc)}).") from None
    if not isinstance(state, dict) or not all(isinstance(tensor, torch.Tensor) for tensor in state.values()):
        raise UnsupportedCheckpointError(f"{path}: expected a flat mapping of names to tensors.")
    return state


def _rename_weight_norm(state: dict[str, torch.Tensor], model_keys: Any) -> dict[str, torch.Tensor]:
    """``state`` with legacy ``<module>.weight_g``/``weight_v`` renamed to the model's weight_norm parametrization
    names (``<module>.parametrizations.weight.original0``/``original1``) where the model uses them."""
    model_keys = set(model_keys)
    renamed = {}
    for key, tensor in state.items():
        module, _, leaf = key.rpartition(".")
        parametrized = f"{module}.parametrizations.weight.{WEIGHT_NORM_NAMES.get(leaf)}"
        renamed[parametrized if leaf in WEIGHT_NORM_NAMES and parametrized in model_keys else key] = tensor
    return renamed


def _check_weights_fit(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], weights_path: Path) -> None:
    """Raise unless ``state`` provides exactly the model's tensors, each with the model's shape."""
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    mismatched = sorted(f"{key} {tuple(state[key].shape)} != {tuple(expected[key].shape)}"
                        for key in state.keys() & expected.keys() if state[key].shape != expected[key].shape)
    problems = [f"{len(keys)} {what} ({_preview(keys)})"
                for what, keys in (("missing", missing), ("unexpected", unexpected), ("with another shape", mismatched))
                if keys]
    if problems:
        raise UnsupportedCheckpointError(f"{weights_path}: the weights do not fit transformers' HubertModel built "
                                         f"from {CONFIG_FILE}: " + "; ".join(problems) + ".")


def _preview(keys: list[str], shown: int = 5) -> str:
    """The first few keys, and how many more there are."""
    more = f", and {len(keys) - shown} more" if len(keys) > shown else ""
    return ", ".join(keys[:shown]) + more
