"""Prefect artifacts for a run: summary, stages, memory, GPU, failed files and progress, under stable keys."""

from __future__ import annotations

from typing import TYPE_CHECKING
from uuid import UUID

from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)

from mess_ai.pipeline import FileCounts, RunSummary
from mess_ai.reporting import (
    artifact_key,
    failures_table,
    gpu_markdown,
    memory_table,
    progress_report,
    stage_table,
    summary_table,
)
from mess_ai.store import FAILED, FeatureStore

if TYPE_CHECKING:
    from mess_ai.analysis.results import AnalysisReport


def start_progress(dataset: str, counts: FileCounts) -> UUID:
    """The progress artifact: files settled (done, failed, skipped, ...) of all files found."""
    percent, description = progress_report(counts)
    return create_progress_artifact(percent, key=artifact_key(dataset, "progress"), description=description)


def update_progress(artifact_id: UUID, counts: FileCounts) -> None:
    percent, description = progress_report(counts)
    update_progress_artifact(artifact_id, percent, description=description)


def publish_run_artifacts(summary: RunSummary, store: FeatureStore) -> None:
    """Create the run's artifacts; each key keeps its history across runs in the UI."""
    dataset = summary.dataset
    create_table_artifact(summary_table(summary), key=artifact_key(dataset, "run-summary"),
                          description=f"Run summary: {summary.audio_dir} -> {summary.store} ({dataset})")
    create_table_artifact(stage_table(summary), key=artifact_key(dataset, "stage-times"),
                          description="Time, files and audio seconds per stage (extract: model time only)")
    create_table_artifact(memory_table(summary), key=artifact_key(dataset, "memory"),
                          description="Peak resident memory (RSS) of the run's process, per stage")
    create_markdown_artifact(gpu_markdown(summary), key=artifact_key(dataset, "gpu"),
                             description="GPU device, memory and utilisation")
    failed = store.manifest.rows(dataset, FAILED)
    rows = failures_table(failed, {o.relative_path: o.device for o in summary.failures if o.device})
    create_table_artifact(rows or [{"file": "(none)", "stage": "", "reason": "no failed files", "attempts": 0,
                                    "last attempt (UTC)": "", "retried next run": "", "device": ""}],
                          key=artifact_key(dataset, "failed-files"),
                          description=f"{len(rows)} failed files in dataset {dataset}: stage, reason, attempts")


def publish_analysis_artifacts(report: AnalysisReport) -> None:
    """The analysis metrics, the per-layer table, and the report's notes with the plots (embedded, so the UI shows
    them)."""
    import base64
    from pathlib import Path

    from mess_ai.reporting import analysis_layer_table, analysis_metrics_table

    dataset = report.dataset
    create_table_artifact(analysis_metrics_table(report), key=artifact_key(dataset, "analysis-metrics"),
                          description=f"Embedding analysis of {report.n_tracks} tracks ({dataset})")
    create_table_artifact(analysis_layer_table(report), key=artifact_key(dataset, "analysis-layers"),
                          description="Metrics per hidden state (0 = convolutional front end)")
    sections = [f"# Embedding analysis: {dataset}", "", f"Report: `{report.files.report}`", ""]
    if report.notes:  # e.g. labels of recordings that are not extracted: the reader must see what was left out
        sections += ["## Notes", "", *(f"- {note}" for note in report.notes), ""]
    for name, path in report.files.plots.items():
        encoded = base64.b64encode(Path(path).read_bytes()).decode("ascii")
        sections += [f"## {name.replace('_', ' ')}", "", f"![{name}](data:image/png;base64,{encoded})", "",
                     f"`{path}`", ""]
    create_markdown_artifact("\n".join(sections), key=artifact_key(dataset, "analysis-plots"),
                             description="Analysis notes and plots (the plots also saved as PNG files in the store)")
