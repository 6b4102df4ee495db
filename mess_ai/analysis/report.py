"""The analysis report of a dataset: ``<store>/<dataset>/reports/report.json`` and its PNG plots.

``run_analysis`` is the one entry point the CLI (``mess-ai analyze``) and the Prefect flow both call: it loads
the inputs, computes the ``AnalysisReport`` (``analyze_dataset``), draws its plots (``plot_report``) and writes it
(``write_report``). The JSON never holds NaN or infinity: an undefined metric is ``null``, and a non-finite number
raises before the report or any plot is written.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Mapping

from mess_ai.analysis.dataset_analysis import analyze_dataset, load_inputs
from mess_ai.packages import check_analysis_packages
from mess_ai.analysis.plots import plot_report
from mess_ai.analysis.results import AnalysisReport, ReportFiles
from mess_ai.store.atomic import atomic_write_bytes

REPORT_DIR = "reports"
REPORT_FILE = "report.json"


def write_report(report: AnalysisReport, report_dir: Path, plots: Mapping[str, Path]) -> AnalysisReport:
    """``report`` with its files (``report_dir/report.json`` and ``plots``), written atomically to that file."""
    report = replace(report, files=ReportFiles(report_dir / REPORT_FILE, dict(plots)))
    text = json.dumps(report.to_json(), indent=2, allow_nan=False) + "\n"
    atomic_write_bytes(report.files.report, text.encode("utf-8"))
    return report


def run_analysis(store_root: str | Path, dataset: str | None = None, labels_csv: str | Path | None = None,
                 n_clusters: int | None = None, random_state: int = 0, *, baseline: bool = True,
                 manifest_url: str | None = None) -> AnalysisReport:
    """Analyse a dataset's track embeddings (the mean over hidden states, plus every hidden state on its own)
    and write ``<store>/<dataset>/reports/report.json`` with its plots. Returns the report, with ``files`` set.

    ``labels_csv``: a CSV with a ``file`` column and label columns (without it, the tracks' top folders are the
    labels when there are at least two). ``n_clusters``: fixed k, else chosen by silhouette. ``baseline``: also
    compute MFCC + chroma statistics from the source audio (cached) and report how they compare.
    ``manifest_url``: the store's manifest when it is not the default SQLite file.
    ValueError for fewer than 3 tracks, a bad ``n_clusters``, bad labels or non-finite / mixed-size features;
    ``MissingPackagesError`` without the analysis extra.
    """
    check_analysis_packages(baseline)
    inputs = load_inputs(store_root, dataset, labels_csv, n_clusters, baseline=baseline, manifest_url=manifest_url)
    report = analyze_dataset(inputs, n_clusters, random_state)
    # Serialised once before anything is drawn, so a non-finite number never leaves plots without a report.
    report.to_json()
    report_dir = inputs.data.dataset_dir / REPORT_DIR
    return write_report(report, report_dir, plot_report(report, inputs.layer_mean, report_dir))
