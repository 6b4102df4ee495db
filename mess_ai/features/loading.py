"""Loading the model: from a local directory or the Hugging Face hub (only the files loading needs, from the local
cache when offline), once per process (``get_model``), on the device asked for. MERT-v1 checkpoints go through the
native ``HubertModel`` mapping (``mess_ai.features.mert``), other model types through transformers' ``AutoModel``; a
model that does not take raw audio is refused. transformers and huggingface_hub are imported inside the functions
that use them: importing transformers takes seconds.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mess_ai.errors import ModelUnavailableError, UnsupportedCheckpointError
from mess_ai.features.checkpoint import (
    CONFIG_FILE,
    DEFAULT_MODEL,
    PREPROCESSOR_FILE,
    RANDOM_WEIGHTS_MARKER,
    TORCH_BIN_FILE,
    first_line,
    local_dir,
    unavailable_message,
)
from mess_ai.features.device import resolve_device
from mess_ai.features.identity import model_fingerprint
from mess_ai.features.loaded import LoadedModel
from mess_ai.features.mert import MERT_MODEL_TYPE, load_mert

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)


def load_model(name_or_path: str = DEFAULT_MODEL, revision: str | None = None, device: str = "auto", *,
               trust_remote_code: bool = False) -> LoadedModel:
    """Load a model from a local directory or the Hugging Face hub, ready for inference on ``device``.

    MERT-v1 checkpoints load natively into ``HubertModel`` (no remote code); other model types go through
    ``AutoModel``, running the repository's code only when ``trust_remote_code`` is set.
    """
    target = resolve_device(device)
    source_dir = local_dir(name_or_path) or _download(name_or_path, revision, trust_remote_code)
    config = _read_json(source_dir / CONFIG_FILE, name_or_path, revision)
    preprocessor = _read_json(source_dir / PREPROCESSOR_FILE, name_or_path, revision)
    sampling_rate = preprocessor.get("sampling_rate", config.get("sample_rate"))
    if sampling_rate is None:
        raise UnsupportedCheckpointError(f"{source_dir}: neither {PREPROCESSOR_FILE} ('sampling_rate') nor "
                                         f"{CONFIG_FILE} ('sample_rate') says which sampling rate the model expects.")
    if config.get(RANDOM_WEIGHTS_MARKER):
        logger.warning("Model %s has RANDOM weights (written by write_test_model): its features mean nothing.",
                       name_or_path)

    started = time.perf_counter()
    if config.get("model_type") == MERT_MODEL_TYPE:
        model = load_mert(source_dir, config, name_or_path, revision)
    else:
        model = _load_auto(source_dir, trust_remote_code)
    _check_takes_raw_audio(model, source_dir)
    model = model.float().to(target).eval().requires_grad_(False)
    logger.info("Loaded model %s from %s on %s in %.1f s.", name_or_path, source_dir, target,
                time.perf_counter() - started)
    return LoadedModel(
        model=model,
        name=name_or_path,
        revision=revision,
        device=target,
        sampling_rate=int(sampling_rate),
        # Wav2Vec2FeatureExtractor's own default, for a preprocessor config that does not say.
        do_normalize=bool(preprocessor.get("do_normalize", True)),
        num_hidden_states=model.config.num_hidden_layers + 1,
        hidden_size=model.config.hidden_size,
        source_dir=source_dir,
    )


_MODEL_CACHE: dict[tuple[str, str | None, str, bool], tuple[str, LoadedModel]] = {}
# Prefect runs tasks in threads: without the lock two tasks could each load the model.
_MODEL_CACHE_LOCK = threading.Lock()


def get_model(name_or_path: str = DEFAULT_MODEL, revision: str | None = None, device: str = "auto", *,
              trust_remote_code: bool = False) -> LoadedModel:
    """``load_model``, once per process: later calls with the same arguments return the same ``LoadedModel``.

    A local checkpoint whose files changed since it was loaded (another ``model_fingerprint``) is loaded again.
    """
    key = (name_or_path, revision, str(resolve_device(device)), trust_remote_code)
    fingerprint = model_fingerprint(name_or_path, revision)
    with _MODEL_CACHE_LOCK:
        cached = _MODEL_CACHE.get(key)
        if cached is None or cached[0] != fingerprint:
            _MODEL_CACHE[key] = (fingerprint, load_model(name_or_path, revision, device,
                                                         trust_remote_code=trust_remote_code))
        return _MODEL_CACHE[key][1]


def clear_model_cache() -> None:
    """Forget every model ``get_model`` loaded, so the next call loads again."""
    with _MODEL_CACHE_LOCK:
        _MODEL_CACHE.clear()


def _download(repo_id: str, revision: str | None, trust_remote_code: bool) -> Path:
    """The hub snapshot of ``repo_id`` (from the local cache when offline), holding only what loading needs."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    patterns = [CONFIG_FILE, PREPROCESSOR_FILE, "*.safetensors", TORCH_BIN_FILE]
    if trust_remote_code:
        patterns.append("*.py")
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    # Offline mode, no network, an unknown id or revision, a gated repository, a malformed id: for the user all of
    # them mean the same thing, and the message below says how to fix it.
    except Exception as exc:
        if constants.HF_HUB_OFFLINE:
            reason = f"HF_HUB_OFFLINE is set and it is not in the Hugging Face cache ({constants.HF_HUB_CACHE})"
        elif isinstance(exc, LocalEntryNotFoundError):
            reason = (f"the hub cannot be reached ({first_line(exc)}) and it is not in the "
                      f"Hugging Face cache ({constants.HF_HUB_CACHE})")
        else:
            reason = first_line(exc)
        raise ModelUnavailableError(unavailable_message(repo_id, revision, reason)) from None


def _read_json(path: Path, name_or_path: str, revision: str | None) -> dict[str, Any]:
    """A checkpoint's JSON file as a dict; a missing file means the model is not (fully) available."""
    if not path.is_file():
        raise ModelUnavailableError(unavailable_message(name_or_path, revision, f"{path} is missing"))
    try:
        content = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UnsupportedCheckpointError(f"{path}: cannot be read as JSON ({first_line(exc)}).") from None
    if not isinstance(content, dict):
        raise UnsupportedCheckpointError(f"{path}: expected a JSON object, found {type(content).__name__}.")
    return content


def _load_auto(source_dir: Path, trust_remote_code: bool) -> torch.nn.Module:
    """A non-MERT checkpoint through transformers' AutoModel."""
    from transformers import AutoModel

    try:
        return AutoModel.from_pretrained(str(source_dir), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise UnsupportedCheckpointError(f"{source_dir}: transformers cannot load this model "
                                         f"({first_line(exc)}).") from None


def _check_takes_raw_audio(model: torch.nn.Module, source_dir: Path) -> None:
    """Refuse a model that does not take a raw waveform and give hidden states of a known size (a text or image
    model that AutoModel can build would otherwise fail on every file, or describe the wrong model)."""
    input_name = getattr(model, "main_input_name", None)
    config = getattr(model, "config", None)
    if input_name != "input_values" or not hasattr(config, "num_hidden_layers") or not hasattr(config,
                                                                                               "hidden_size"):
        kind = type(model).__name__
        raise UnsupportedCheckpointError(
            f"{source_dir}: {kind} is not an audio model that takes a raw waveform (its input is "
            f"{input_name!r}, not 'input_values'); mess-ai extracts MERT-style hidden states from audio.")
