"""Which recordings and which config a dataset holds: recorded on its first run; a run from another folder, or with
another config, is refused (``DatasetMismatchError``) unless it asks to re-extract."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

from mess_ai.errors import DatasetMismatchError
from mess_ai.store import FeatureStore

log = logging.getLogger(__name__)


def describe_config_change(old: dict[str, Any], new: dict[str, Any]) -> str:
    """'window 5.0 s -> 10.0 s, precision bf16 -> fp32': what differs between two ``ExtractConfig.describe``."""
    if not old:
        return "a config recorded before mess-ai kept dataset configs"
    names = {"model_fingerprint": "model weights", "window_seconds": "window", "hop_seconds": "hop",
             "min_duration_seconds": "minimum duration", "precision": "precision", "model": "model"}
    units = {"window_seconds": " s", "hop_seconds": " s", "min_duration_seconds": " s"}
    changes = [f"{label} {old.get(name)}{units.get(name, '')} -> {new.get(name)}{units.get(name, '')}"
               for name, label in names.items() if old.get(name) != new.get(name)]
    return ", ".join(changes) or "the same settings (another content key: the key's format changed)"


def recorded_precision(store: FeatureStore) -> str | None:
    """The precision of the dataset's features: that of its recorded config, else of its provenance (a dataset of
    an earlier mess-ai); None for a new dataset."""
    record = store.manifest.dataset_record(store.dataset)
    recorded = record["configs"].get(record["config_key"], {}) if record else {}
    return recorded.get("precision") or (store.read_provenance() or {}).get("precision")


def open_dataset(store: FeatureStore, audio_dir: str | Path, key: str, description: dict[str, Any],
                 reextract: bool) -> None:
    """Check that a run of config ``key`` (``description``: its ``ExtractConfig.describe``) reading ``audio_dir``
    may write the store's dataset, and record what the dataset is on its first run.

    A dataset holds the recordings of one audio folder, extracted with one config: a run from another folder
    (``2023/audio`` and ``2024/audio`` both default to the dataset ``audio``) would overwrite the features of
    the files both folders name alike, and a run with another config would silently re-extract everything (or,
    stopped half-way, leave a mix). Both raise ``DatasetMismatchError``, unless ``reextract`` asks for the new
    config: then the dataset's config changes, and its tracks are re-extracted as the run reaches them (their
    old features are kept until new ones replace them; until the last one has, the dataset is mixed).
    A dataset of an earlier mess-ai, with no record yet, is recorded from its manifest rows and this run."""
    folder = os.path.realpath(audio_dir)
    manifest, dataset = store.manifest, store.dataset
    record = manifest.dataset_record(dataset)
    if record is None:
        recorded_folder = _folder_of_rows(store)
        if recorded_folder is not None and recorded_folder != folder:
            raise _other_folder(store, recorded_folder, folder)
        if manifest.create_dataset_record(dataset, audio_dir=folder, config_key=key, configs={key: description}):
            stale = {k: n for k, n in manifest.feature_configs(dataset).items() if k != key}
            if stale:
                log.warning("Dataset '%s' was extracted by an earlier mess-ai, whose content keys named the "
                            "weights differently: its %d tracks are extracted again by this run (once).",
                            dataset, sum(stale.values()))
            return
        record = manifest.dataset_record(dataset)  # created by a run at the same moment
    if record["audio_dir"] != folder:
        raise _other_folder(store, record["audio_dir"], folder)
    if record["config_key"] != key:
        change = describe_config_change(record["configs"].get(record["config_key"], {}), description)
        if not reextract:
            raise DatasetMismatchError(
                f"dataset '{dataset}' of store {store.root} holds features extracted with another config than this "
                f"run's ({change}). To keep both, extract into another dataset: --dataset NAME (flow parameter "
                f"'dataset'); to replace its features with this config's, ask for it: --reextract (flow parameter "
                f"'reextract'). Nothing was changed.")
        log.warning("Re-extracting dataset '%s' with a new config (%s): its tracks are redone as the run reaches "
                    "them; their old features stay until new ones replace them, and until every track is redone "
                    "`mess-ai check` reports the dataset as mixed and the analysis refuses it.", dataset, change)
        manifest.update_dataset_record(dataset, config_key=key, configs={**record["configs"], key: description})


def _other_folder(store: FeatureStore, recorded: str, folder: str) -> DatasetMismatchError:
    suggestion = re.sub(r"[^A-Za-z0-9._-]+", "_", "-".join(Path(folder).parts[-2:])).lstrip(".-_")[:100]
    return DatasetMismatchError(
        f"dataset '{store.dataset}' of store {store.root} holds the recordings of {recorded}; this "
        f"run reads {folder}. Two folders cannot share a dataset (files named alike would overwrite each "
        f"other's features): name this folder's dataset, e.g. --dataset {suggestion or 'NAME'} "
        f"(flow parameter 'dataset'). Nothing was changed.")


def _folder_of_rows(store: FeatureStore) -> str | None:
    """The audio folder a dataset of an earlier mess-ai (no record) was extracted from: its rows' source paths
    without their relative paths (the most common one), or None for a dataset without rows."""
    folders: dict[str, int] = {}
    for row in store.manifest.rows(store.dataset):
        source, relative = row["source_path"], row["relative_path"]
        if source.endswith(relative):
            folder = os.path.realpath(source[: len(source) - len(relative)].rstrip("/") or "/")
            folders[folder] = folders.get(folder, 0) + 1
    return max(folders, key=folders.__getitem__) if folders else None
