"""What a dataset's features were made with (model weights, windows, precision, library versions): written once
next to them as ``provenance.json``, checked by the plan before it trusts stored features, and read back to embed a
query recording the way the dataset's own were (``extraction_config``, ``model_difference``)."""

from __future__ import annotations

import platform
from typing import Any

import numpy as np

import mess_ai
from mess_ai.config import ExtractConfig
from mess_ai.errors import MessError
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


# What embedding a recording the way a dataset's own were reads from its provenance record.
_CONFIG_FIELDS = ("config_key", "model", "revision", "resolved_revision", "model_fingerprint", "window_seconds",
                  "hop_seconds", "min_duration_seconds", "precision")


def extraction_config(provenance: dict[str, Any], dataset: str, device: str = "auto") -> ExtractConfig:
    """The ``ExtractConfig`` a dataset's features were made with, from its provenance record, to run on
    ``device``: the model and revision, the windows and the precision (the input limits are the defaults: they
    refuse files but never change features). ``MessError`` naming the missing fields of a record without them."""
    missing = [name for name in _CONFIG_FIELDS if name not in provenance]
    if missing:
        raise MessError(f"the provenance record of dataset '{dataset}' lacks {', '.join(missing)}: it does not "
                        "say how its features were made (written by an earlier mess-ai? re-extract the dataset)")
    return ExtractConfig(model=provenance["model"], revision=provenance["revision"], device=device,
                         precision=provenance["precision"], window_seconds=provenance["window_seconds"],
                         hop_seconds=provenance["hop_seconds"],
                         min_duration_seconds=provenance["min_duration_seconds"])


def model_difference(provenance: dict[str, Any], identity: dict[str, Any]) -> str | None:
    """How the checkpoint ``identity`` (``model_identity``'s) differs from the one a dataset's ``provenance``
    records, in words (which weight files, which commit), or None when it is the same."""
    if identity["fingerprint"] == provenance["model_fingerprint"]:
        return None
    recorded, now = provenance.get("weights_sha256"), identity["weights_sha256"]
    if recorded is None or now is None:  # a hub model on one side: the fingerprints name the commits
        return f"{identity['fingerprint']} now, {provenance['model_fingerprint']} when the features were made"
    changes = [f"{name}: sha256 {now[name][:12]} now, {recorded[name][:12]} when the features were made"
               for name in sorted(set(now) & set(recorded)) if now[name] != recorded[name]]
    changes += [f"{name} is new" for name in sorted(set(now) - set(recorded))]
    changes += [f"{name} is gone" for name in sorted(set(recorded) - set(now))]
    return "; ".join(changes) or "its config files differ (config.json or preprocessor_config.json)"
