"""What the CLI prints at the end of a run: the summary a person reads, and where to see the run in Prefect's UI."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any


def _format_seconds(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


def print_summary(summary: Any, out: Any = None) -> None:
    """The end-of-run report a person reads."""
    p = lambda *a: print(*a, file=out or sys.stdout)  # noqa: E731
    rtf = summary.real_time_factor
    counts = summary.counts
    p(f"mess-ai: {counts.discovered} audio files found in {summary.audio_dir} -> store {summary.store}, "
      f"dataset '{summary.dataset}'")
    for label, count in counts.categories(empty=False):
        p(f"  {label + ':':<44}{count:>6}")
    p(f"  {'new or changed (needed work):':<44}{counts.new_or_changed:>6}")
    if summary.done:
        p(f"  audio extracted: {_format_seconds(summary.audio_seconds)} in {_format_seconds(summary.wall_seconds)}"
          + (f" ({rtf:.1f}x real time)" if rtf else ""))
    elif not summary.model_loaded:
        p("  nothing new to extract: the model was not loaded")
    if len(summary.files_by_device) > 1:
        from mess_ai.reporting import describe_devices

        p(f"  model work on {len(summary.files_by_device)} devices: {describe_devices(summary.files_by_device)}")
    if summary.failures:
        p("  failed files:")
        for f in summary.failures:
            p(f"    {f.relative_path}  [{f.stage}] {f.reason}  (attempts: {f.attempts})")
    if summary.integrity_problems:
        p("  store problems:")
        for problem in summary.integrity_problems:
            p(f"    {problem}")
    p(f"  features: {Path(summary.store) / summary.dataset}/{{segments,aggregated}}/<track_id>.npy")


def prefect_ui_hint() -> str:
    """Where a person sees the flow run and its artifacts."""
    if os.environ.get("PREFECT_API_URL"):
        where = os.environ["PREFECT_API_URL"].removesuffix("/api")
        return f"  the run and its artifacts: {where}/runs and {where}/artifacts"
    return ("  the run and its artifacts are in Prefect's local database: start the UI with `make server` "
            "(or `.venv/bin/prefect server start`) and open http://127.0.0.1:4200/runs and /artifacts")
