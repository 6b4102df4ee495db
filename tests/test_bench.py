"""Smoke test of the benchmarks: `python -m bench --quick` runs and writes results of the expected form.

Speed is the benchmarks' business (`make bench`); nothing here looks at a figure's value.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_quick_benchmarks_write_their_results(tmp_path):
    # One benchmark that needs no Prefect API: a quick one that does (noop) spent 24 s starting its own, and the
    # suite has to stay within 10 minutes; `make bench` runs them all.
    completed = subprocess.run([sys.executable, "-m", "bench", "gpu", "--quick", "--results", str(tmp_path)],
                               cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    result = json.loads((tmp_path / "gpu.json").read_text())
    assert result["benchmark"] == "gpu" and result["quick"] is True and "error" not in result
    assert {"date", "machine", "figures", "targets", "notes"} <= result.keys()
    assert {"cpu", "logical_cores", "ram_gib"} <= result["machine"].keys()
    assert result["targets"] and all({"target", "measured", "met", "why"} <= t.keys() for t in result["targets"])
    assert all({"label", "value", "unit"} <= f.keys() for f in result["figures"])


def test_the_report_lists_every_target(tmp_path):
    from bench.report import render

    result = {"benchmark": "noop", "date": "2026-01-01T00:00:00+00:00", "quick": False,
              "machine": {"cpu": "CPU", "logical_cores": 2, "physical_cores": 2, "ram_gib": 8.0, "os": "Linux",
                          "python": "3.11", "torch": "2", "torch_threads": 2, "cuda": None},
              "figures": [{"label": "whole no-op flow run", "value": 1.25, "unit": "s"}],
              "targets": [{"target": "t <= 1.5 s", "measured": "1.25 s", "met": True, "why": ""}], "notes": ["n"]}
    text = render([result])
    assert "| noop | t <= 1.5 s | 1.25 s | met |" in text
    assert "| whole no-op flow run | 1.25 | s |" in text and "2 logical cores" in text
