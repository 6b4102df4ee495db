"""Run reports as plain data: the tables and text the Prefect artifacts (and the CLI) show.

Pure functions of a ``RunSummary`` and manifest rows, so they are tested without Prefect.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from mess_ai.extraction.stats import STAGES, FileCounts, RunSummary

if TYPE_CHECKING:
    from mess_ai.analysis.results import AnalysisReport


def artifact_key(dataset: str, what: str) -> str:
    """A stable Prefect artifact key (lowercase letters, digits, dashes) per dataset and kind, so the UI's
    Artifacts page shows one history per key across nightly runs."""
    slug = re.sub(r"[^a-z0-9]+", "-", dataset.lower()).strip("-") or "dataset"
    return f"mess-ai-{slug}-{what}"[:100]


def summary_table(summary: RunSummary) -> list[dict[str, Any]]:
    """Files found, then what became of each (the categories sum to the files found), then the run's measures."""
    hours = summary.audio_seconds / 3600
    rtf = summary.real_time_factor
    counts = summary.counts
    rows = [
        ("audio files found", counts.discovered),
        *counts.categories(),
        ("new or changed (needed work)", counts.new_or_changed),
        ("store problems", len(summary.integrity_problems)),
        ("audio extracted (hours)", round(hours, 4)),
        ("wall time (s)", round(summary.wall_seconds, 2)),
        ("real-time factor (audio s per wall s)", round(rtf, 1) if rtf else "n/a"),
        ("model loaded", "yes" if summary.model_loaded else "no (nothing new)"),
        ("files per device (model work)", describe_devices(summary.files_by_device) or "none"),
    ]
    return [{"measure": name, "value": value} for name, value in rows]


def describe_devices(files_by_device: dict[str, int]) -> str:
    """'cuda:0: 12 files, cuda:1: 11 files': where the model work of a run's files ran."""
    return ", ".join(f"{device}: {count} file{'s' if count != 1 else ''}" for device, count in files_by_device.items())


def progress_report(counts: FileCounts) -> tuple[float, str]:
    """Percent of the files found that are settled, and what became of them: '5 of 6 files settled (6 found = 2
    done (extracted now) + 1 failed now + 2 unchanged (skipped) + 1 to do)'."""
    percent = 100.0 * counts.settled / counts.discovered if counts.discovered else 100.0
    return percent, f"{counts.settled} of {counts.discovered} files settled ({counts.describe(finished=False)})"


def stage_table(summary: RunSummary) -> list[dict[str, Any]]:
    return [{"stage": stage, "seconds": round(summary.stage_seconds.get(stage, 0.0), 3),
             "files": summary.stage_files.get(stage, 0),
             "audio seconds": round(summary.stage_audio_seconds.get(stage, 0.0), 1)} for stage in STAGES]


def memory_table(summary: RunSummary) -> list[dict[str, Any]]:
    resources = summary.resources or {}
    rows = [{"stage": "whole run", "peak RSS (MB)": round(resources.get("peak_rss_mb", 0.0), 1)},
            {"stage": "at start", "peak RSS (MB)": round(resources.get("start_rss_mb", 0.0), 1)}]
    for stage in STAGES:
        peak = (resources.get("peak_rss_mb_by_stage") or {}).get(stage)
        if peak is not None:
            rows.append({"stage": stage, "peak RSS (MB)": round(peak, 1)})
    return rows


def gpu_markdown(summary: RunSummary) -> str:
    """The run's GPU use: one table for one GPU; for several, a row per GPU (each model worker's own) and the
    whole run's."""
    resources = summary.resources or {}
    gpu = resources.get("gpu") or {}
    if not gpu.get("available"):
        return f"## GPU\n\n{gpu.get('note') or 'CPU-only run: no GPU was used'}.\n"
    gpus = resources.get("gpus") or []
    if len(gpus) > 1:
        return _gpus_markdown(gpu, gpus)
    lines = ["## GPU", "", "| measure | value |", "|---|---|", f"| device | {gpu.get('device_name')} |",
             f"| peak allocated (MB) | {gpu.get('peak_allocated_mb', 0):.0f} |",
             f"| peak reserved (MB) | {gpu.get('peak_reserved_mb', 0):.0f} |"]
    if gpu.get("mean_utilization_percent") is not None:
        lines += [f"| mean utilisation (%) | {gpu['mean_utilization_percent']:.0f} |",
                  f"| peak utilisation (%) | {gpu['peak_utilization_percent']:.0f} |",
                  f"| peak memory used, NVML (MB) | {gpu['peak_nvml_memory_used_mb']:.0f} |"]
    if gpu.get("note"):
        lines += ["", gpu["note"]]
    return "\n".join(lines) + "\n"


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f}"


def _gpus_markdown(whole: dict[str, Any], gpus: list[dict[str, Any]]) -> str:
    lines = ["## GPUs", "", f"{len(gpus)} GPUs ({whole.get('device_name')}), one model worker each.", "",
             "| device | name | peak allocated (MB) | peak reserved (MB) | mean utilisation (%) | peak utilisation (%) "
             "| peak memory used, NVML (MB) |", "|---|---|---|---|---|---|---|"]
    for row in [*gpus, {**whole, "device": "**all**", "device_name": ""}]:
        lines.append(f"| {row.get('device')} | {row.get('device_name')} | {row.get('peak_allocated_mb') or 0:.0f} | "
                     f"{row.get('peak_reserved_mb') or 0:.0f} | {_percent(row.get('mean_utilization_percent'))} | "
                     f"{_percent(row.get('peak_utilization_percent'))} | "
                     f"{_percent(row.get('peak_nvml_memory_used_mb'))} |")
    if whole.get("note"):
        lines += ["", whole["note"]]
    return "\n".join(lines) + "\n"


def failures_table(rows: list[dict[str, Any]], devices: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Manifest rows of failed files → what a person reads: file, stage, reason, attempts, last attempt, and the
    device its model work ran on when it failed there in this run (``devices``: by relative path)."""
    devices = devices or {}
    return [{"file": r["relative_path"], "stage": r["failure_stage"], "reason": r["error_message"],
             "attempts": r["attempts"],
             "last attempt (UTC)": r["last_attempt_at"].strftime("%Y-%m-%d %H:%M:%S") if r["last_attempt_at"] else "",
             "retried next run": "no (same bytes)" if r["permanent"] else "yes",
             "device": devices.get(r["relative_path"], "")} for r in rows]


def _rounded(value: Any, digits: int = 4) -> Any:
    return round(value, digits) if isinstance(value, float) else ("n/a" if value is None else value)


def analysis_metrics_table(report: AnalysisReport) -> list[dict[str, Any]]:
    """The headline numbers of an analysis report, one row each."""
    kmeans, dims, div = report.clusters.kmeans, report.dimension, report.diversity
    rows = [
        ("tracks", report.n_tracks),
        ("clusters (k-means)", kmeans.n_clusters),
        ("cluster sizes", ", ".join(map(str, kmeans.sizes))),
        ("silhouette", kmeans.silhouette),
        ("Calinski-Harabasz", kmeans.calinski_harabasz),
        ("Davies-Bouldin", kmeans.davies_bouldin),
        ("outliers", len(report.outliers.tracks)),
        ("near-duplicate pairs", report.near_duplicates.count),
        ("anisotropy (mean cosine, raw)", report.quality.anisotropy),
        ("PCA components for 90 %", dims.pca_components_90),
        ("PCA components for 95 %", dims.pca_components_95),
        ("participation ratio", dims.participation_ratio),
        ("intrinsic dimension", dims.intrinsic_dimension),
        ("mean pairwise cosine distance", div.mean_pairwise_cosine_distance),
        ("Vendi score", div.vendi_score),
    ]
    return [{"measure": name, "value": _rounded(value)} for name, value in rows]


def analysis_layer_table(report: AnalysisReport) -> list[dict[str, Any]]:
    """One row per hidden state, so a person can pick a layer."""
    rows = []
    for layer in report.per_layer:
        entry = layer.to_json()
        row = {"layer": entry["layer"]}
        for key, value in entry.items():
            if key == "layer":
                continue
            if isinstance(value, dict):
                row.update({f"{key} ({k})": _rounded(v) for k, v in value.items()})
            else:
                row[key] = _rounded(value)
        rows.append(row)
    return rows
