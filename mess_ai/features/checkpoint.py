"""A checkpoint as files: the names a model directory's files go by, whether a model name is a local directory or a
hub id, and the one message for a model that is not available (what failed, and three ways to fix it). The loader,
the model's identity and the MERT mapping all read checkpoints through these names.
"""

from __future__ import annotations

from pathlib import Path

from mess_ai.errors import ModelUnavailableError

DEFAULT_MODEL = "m-a-p/MERT-v1-95M"

CONFIG_FILE = "config.json"
PREPROCESSOR_FILE = "preprocessor_config.json"
SAFETENSORS_FILE = "model.safetensors"
TORCH_BIN_FILE = "pytorch_model.bin"
# A config.json field: the weights are random (``write_test_model``), so loading them logs a warning.
RANDOM_WEIGHTS_MARKER = "mess_ai_random_weights"


def local_dir(name_or_path: str) -> Path | None:
    """The directory ``name_or_path`` names, or None when it is a hub id; a path that is not a directory raises."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.is_absolute() or name_or_path.startswith((".", "~")) or path.exists():
        reason = "it is not a directory" if path.exists() else "no such directory"
        raise ModelUnavailableError(unavailable_message(name_or_path, None, reason))
    return None


def unavailable_message(name_or_path: str, revision: str | None, reason: str) -> str:
    """One message saying which model is missing, why, and the three ways to make it available."""
    looks_like_hub_id = not Path(name_or_path).expanduser().is_absolute() and not name_or_path.startswith((".", "~"))
    hub_id = name_or_path if looks_like_hub_id else DEFAULT_MODEL
    named = f"{name_or_path} (revision {revision or 'main'})" if looks_like_hub_id else name_or_path
    download = f"hf download {hub_id}" + (f" --revision {revision}" if revision else "")
    return (f"Model {named} is not available: {reason.rstrip('.')}. To make it "
            f"available: download it where there is network (`{download}`); or copy that Hugging Face cache here "
            f"and set HF_HUB_OFFLINE=1; or pass a local directory holding {CONFIG_FILE}, {PREPROCESSOR_FILE} and "
            f"the weights (`--model /path/to/{hub_id.rsplit('/', 1)[-1]}`).")


def first_line(exc: BaseException) -> str:
    """``Type: first line of the message``: hub and library errors run to several lines of advice that ours
    replaces."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
