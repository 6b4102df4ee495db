"""Exceptions of mess-ai: each names what failed and why, in words a user understands."""

from __future__ import annotations

from pathlib import Path


class MessError(Exception):
    """Base class of every error mess-ai raises on purpose."""


class InputError(MessError):
    """One input file is unusable, deterministically: retrying will not help.

    ``stage`` is the pipeline stage that found the problem (``validate``, ``load``, ...),
    ``reason`` a sentence for a person. The run records it against the file and goes on.
    """

    def __init__(self, path: str | Path, reason: str, stage: str) -> None:
        self.path = str(path)
        self.reason = reason
        self.stage = stage
        super().__init__(f"{self.path}: {reason}")


class AudioError(InputError):
    """An audio file cannot be read, decoded or used (not audio, too short, non-finite samples, ...)."""


class ModelError(MessError):
    """The model cannot be used at all; a run cannot start without it."""


class ModelUnavailableError(ModelError):
    """The model is neither on disk nor downloadable (offline, unknown id, missing files)."""


class UnsupportedCheckpointError(ModelError):
    """A checkpoint switches on something the native loader cannot reproduce, or its weights do not fit."""


class StoreError(MessError):
    """The feature store cannot be used (not writable, corrupt manifest, ...)."""


class DatasetMismatchError(StoreError):
    """A run would write a dataset that holds another folder's recordings, or features of another config."""


class TrackBusyError(StoreError):
    """Another process holds the lock of a track right now."""
