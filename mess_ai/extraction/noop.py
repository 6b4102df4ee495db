"""Finding out, read-only and without Prefect, torch or the model, that a run would have nothing to do: what
``mess-ai extract`` checks before it starts a flow run, so that a run with nothing new ends in well under a second
of work instead of paying for starting Prefect and a flow run. The plan is the flow's own (``file_states`` and
``plan_files``); only its answer "nothing to do" is used, every other case is left to the flow."""

from __future__ import annotations

import os
import time
from pathlib import Path

from mess_ai.audio.discovery import discover_audio
from mess_ai.config import ExtractConfig
from mess_ai.deadline import Activity
from mess_ai.extraction.dataset import recorded_precision
from mess_ai.extraction.plan import Decision, Selection, plan_files, settled_outcome
from mess_ai.extraction.stats import RunStats, RunSummary
from mess_ai.extraction.steps import file_states, plan_rows
from mess_ai.features.identity import model_identity
from mess_ai.gc_pause import gc_paused
from mess_ai.store.integrity import IntegrityReport, check_dataset
from mess_ai.store.layout import MANIFEST_FILE, FeatureStore


def nothing_new(audio_dir: str | Path, store_root: str | Path, dataset: str, config: ExtractConfig, *,
                only_failed: bool = False, manifest_url: str | None = None) -> RunSummary | None:
    """The summary of a run of ``config`` over ``audio_dir`` into ``dataset`` of the store when it would find
    nothing to do: every file unchanged, failed for good on the same bytes, or not selected (``only_failed``), and
    the dataset's files in order. None when the run has work, or when only the run can say what happens: no store
    or dataset yet, another folder or config recorded for the dataset (the run refuses it, or re-extracts), a
    precision only the device decides, temporary files to sweep or problems in the store.

    Reads the folder, the manifest and the headers of the stored features (hashing only files whose size or
    mtime changed since they were hashed); writes nothing. ``FileNotFoundError`` for a missing folder, and the
    errors of ``model_identity`` for a model that cannot be found, as the run would raise them.
    """
    started = time.perf_counter()
    audio_dir = Path(audio_dir)
    if not audio_dir.is_dir():
        raise FileNotFoundError(f"audio folder {audio_dir} does not exist or is not a folder")
    root = Path(store_root)
    # FeatureStore would create a missing store; a store without this dataset's folder has work anyway.
    if not (root / dataset).is_dir() or (manifest_url is None and not (root / MANIFEST_FILE).is_file()):
        return None
    store = FeatureStore(root, dataset, manifest_url)
    try:
        record = store.manifest.dataset_record(dataset)
        if record is None or record["audio_dir"] != os.path.realpath(audio_dir):
            return None
        # resolve_precision without a device: an explicit precision is the run's, and `auto` on a dataset that
        # has features is the dataset's own.
        precision = recorded_precision(store) if config.precision == "auto" else config.precision
        if precision not in ("fp32", "bf16"):
            return None
        key = config.key(precision, model_identity(config.model, config.revision)["fingerprint"])
        if record["config_key"] != key:
            return None
        stats = RunStats()
        selection = Selection(only_failed)
        with stats.stage("discover"), gc_paused():
            sources = discover_audio(audio_dir)
            stats.found(len(sources))
            rows = plan_rows(store, sources, selection, whole_dataset=True)
            states = file_states(store, sources, rows, key, selection, config.keep_raw, Activity())
            decisions = plan_files(states, key, selection)
        if any(decision.needs_work for decision in decisions) or store.temp_files():
            return None
        for source, state, decision in zip(sources, states, decisions):
            # Unchanged files are only counted, as the run counts them.
            outcome = settled_outcome(source.track_id, source.relative, state.row, decision)
            if outcome is not None and decision != Decision.UNCHANGED:
                stats.record(outcome, announce=False)
        stats.planned([], decisions.count(Decision.NOT_SELECTED), decisions.count(Decision.UNCHANGED))
        with stats.stage("integrity"):
            # The run's own check of a run that settles no track: the provenance and the config mix.
            report = IntegrityReport()
            check_dataset(store, report, check_values=False, track_ids=[])
        if report.problems:
            return None
        return stats.summary(str(audio_dir), str(store.root), dataset, time.perf_counter() - started, [],
                             model_loaded=False)
    finally:
        store.close()
