"""storage: bytes per audio hour in the store, with default outputs (target <= 60 MB) and with raw.

Feature files depend only on the model's output shape, so the overhead probe (MERT-v1-95M's shapes) writes exactly
the bytes MERT would. Default outputs are measured on one hour of audio; raw, at ~10 GB per hour, on six minutes and
scaled to the hour (raw grows linearly with the windows).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.common import (
    add_figure,
    add_target,
    audio_set,
    flow_model_loader,
    folder_bytes,
    new_result,
    run_flow,
    warm_up_flow,
)
from bench.probe import OVERHEAD_PROBE, overhead_probe

NAME = "storage"
TARGET_BYTES_PER_HOUR = 60e6


def _extract(workdir: Path, audio: Path, label: str, keep_raw: bool) -> tuple[Path, float]:
    """Run the flow with the probe into a new store; returns the store and the audio hours extracted."""
    store = workdir / "stores" / f"{NAME}-{label}"
    with flow_model_loader(overhead_probe):
        summary = run_flow(audio, store, OVERHEAD_PROBE, dataset=NAME, keep_raw=keep_raw)
    if summary["failed"] or not summary["done"]:
        raise RuntimeError(f"the flow failed on some files: {summary['outcomes']}")
    return store, summary["audio_seconds"] / 3600


def run(workdir: Path, quick: bool) -> dict[str, Any]:
    result = new_result(NAME, quick)
    default_set, raw_set = ((2, 20.0), (2, 20.0)) if quick else ((20, 180.0), (2, 180.0))
    warm_up_flow(workdir)

    store, hours = _extract(workdir, audio_set(workdir, *default_set), "default", keep_raw=False)
    dataset = store / NAME
    segments = folder_bytes(dataset / "segments", "*.npy") / hours
    aggregated = folder_bytes(dataset / "aggregated", "*.npy") / hours
    whole = folder_bytes(store) / hours
    raw_store, raw_hours = _extract(workdir, audio_set(workdir, *raw_set), "raw", keep_raw=True)
    raw = folder_bytes(raw_store / NAME / "raw", "*.npy") / raw_hours
    whole_raw = folder_bytes(raw_store) / raw_hours

    add_figure(result, "segments", segments / 1e6, "MB per audio hour")
    add_figure(result, "aggregated", aggregated / 1e6, "MB per audio hour")
    add_figure(result, "whole store, default outputs (features, manifest, provenance)", whole / 1e6,
               "MB per audio hour")
    add_figure(result, "raw", raw / 1e9, "GB per audio hour")
    add_figure(result, "whole store with raw", whole_raw / 1e9, "GB per audio hour")
    add_target(result, f"default outputs <= {TARGET_BYTES_PER_HOUR / 1e6:g} MB per audio hour",
               f"{whole / 1e6:.1f} MB", whole <= TARGET_BYTES_PER_HOUR,
               "segments are float32 [n_windows, 13, 768] = 39,936 bytes per 5 s window every 2.5 s")
    result["notes"] += [
        f"Default outputs: {default_set[0]} files of {default_set[1]:g} s; raw: {raw_set[0]} files of "
        f"{raw_set[1]:g} s, scaled to the hour. Flow defaults (5 s windows, 2.5 s hop), overhead probe as the model.",
        "Apparent file sizes (st_size) of everything under the store, SQLite manifest and provenance included; "
        "MB = 1e6 bytes, GB = 1e9 bytes.",
    ]
    result["details"] = {"default_hours": hours, "raw_hours": raw_hours, "bytes_per_hour": {
        "segments": segments, "aggregated": aggregated, "whole_default": whole, "raw": raw, "whole_raw": whole_raw}}
    return result
