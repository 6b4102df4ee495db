"""What a dataset's features were made with (model weights, windows, precision, library versions): written once
next to them as ``provenance.json``, and checked by the plan before it trusts stored features."""

from __future__ import annotations

import platform
from typing import Any

import numpy as np

import mess_ai
from mess_ai.config import ExtractConfig
from mess_ai.features.extractor import resolve_precision
from mess_ai.features.identity import model_identity
from mess_ai.features.loaded import LoadedModel
from mess_ai.store.keys import FEATURE_FORMAT_VERSION


def library_versions() -> dict[str, str]:
    import soundfile
    import soxr
    import torch
    import transformers

    return {"mess_ai": mess_ai.__version__, "python": platform.python_version(), "numpy": np.__version__,
            "torch": torch.__version__, "transformers": transformers.__version__,
            "soundfile": soundfile.__version__, "libsndfile": soundfile.__libsndfile_version__,
            "soxr": soxr.__version__}


def build_provenance(config: ExtractConfig, model: LoadedModel, key: str, precision: str | None = None,
                     identity: dict[str, Any] | None = None) -> dict[str, Any]:
    identity = identity or model_identity(config.model, config.revision)
    return {
        "config_key": key,
        "feature_format_version": FEATURE_FORMAT_VERSION,
        "model": config.model,
        "revision": config.revision,
        "resolved_revision": identity["resolved_revision"],
        "model_fingerprint": identity["fingerprint"],
        "weights_sha256": identity["weights_sha256"],
        "sampling_rate": model.sampling_rate,
        "do_normalize": model.do_normalize,
        "window_seconds": config.window.window_seconds,
        "hop_seconds": config.window.hop_seconds,
        "min_duration_seconds": config.window.min_duration_seconds,
        "num_hidden_states": model.num_hidden_states,
        "hidden_size": model.hidden_size,
        "layers": list(range(model.num_hidden_states)),
        "precision": precision or resolve_precision(config.precision, model.device),
        "scales": {
            "aggregated": "float32 [n_hidden_states, hidden_size]: mean over all windows and frames",
            "segments": "float32 [n_windows, n_hidden_states, hidden_size]: mean over each window's frames",
            "raw": "float16 [n_windows, n_hidden_states, frames, hidden_size] (only with keep_raw)",
        },
        "versions": library_versions(),
    }
