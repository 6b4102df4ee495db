"""Content keys: what decides whether stored features are still the right ones for a file."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

# Bump when the meaning or layout of stored features changes, so old stores are re-extracted.
FEATURE_FORMAT_VERSION = 1


def sha256_file(path: str | Path, block_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(block_size):
            digest.update(block)
    return digest.hexdigest()


def config_key(fields: dict[str, Any]) -> str:
    """A short stable hash of everything that changes the features (model identity, windowing, precision)."""
    payload = json.dumps({"format": FEATURE_FORMAT_VERSION, **fields}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]
