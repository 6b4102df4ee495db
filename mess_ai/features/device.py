"""Device choice: which torch device a run uses. ``auto`` takes the best one present; a device asked for by name must
be usable here, or the run is refused before any model is loaded."""

from __future__ import annotations

import torch

from mess_ai.errors import ModelError


def resolve_device(device: str = "auto") -> torch.device:
    """The torch device to run on: ``auto`` picks cuda, then mps, then cpu; an explicit device must be usable."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise ValueError(f"Unknown device {device!r}; use 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'.") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelError(f"Device {device!r} was asked for, but CUDA is not available to torch "
                             f"{torch.__version__}.")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ModelError(f"Device {device!r} was asked for, but only {torch.cuda.device_count()} CUDA device(s) "
                             f"are visible.")
    elif resolved.type == "mps":
        if not torch.backends.mps.is_available():
            raise ModelError(f"Device {device!r} was asked for, but MPS is not available to torch {torch.__version__}.")
    elif resolved.type != "cpu":
        raise ValueError(f"Unsupported device {device!r}; use 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'.")
    return resolved
