"""Resource monitoring: peaks charged to the stages that lived through them, and the GPU figures of a run that uses
several GPUs (one model worker each) as a row per GPU and the run's whole. The CUDA sampling itself needs a GPU."""

from __future__ import annotations

import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from mess_ai.errors import ModelError
from mess_ai.features.device import STAND_IN_GPUS_ENV, run_devices
from mess_ai.monitoring import GpuStats, ResourceMonitor, ResourceReport, combine_gpus
from mess_ai.reporting import gpu_markdown


def test_a_stage_that_allocates_sees_the_peak_and_one_that_does_not_does_not():
    with ResourceMonitor(torch.device("cpu"), interval_seconds=0.01) as monitor:
        with monitor.stage("small"):
            time.sleep(0.05)
        with monitor.stage("big"):
            block = np.ones(300 * 2**20 // 8)  # 300 MB, touched
            time.sleep(0.3)  # sampled every 10 ms meanwhile
            del block
    report = monitor.report
    assert report.peak_rss_mb_by_stage["big"] >= report.start_rss_mb + 250
    assert report.peak_rss_mb_by_stage["small"] < report.peak_rss_mb_by_stage["big"] - 250
    assert report.gpus == [] and not report.gpu.available and "CPU-only" in report.gpu.note


def test_several_gpus_are_combined_and_shown_a_row_each():
    a = GpuStats(True, "cuda:0", "NVIDIA H100", 1000.0, 1200.0, 80.0, 100.0, 30000.0)
    b = GpuStats(True, "cuda:1", "NVIDIA H100", 3000.0, 3500.0, 40.0, 90.0, 32000.0)
    whole = combine_gpus([a, b])
    assert (whole.device, whole.device_name) == ("cuda:0, cuda:1", "2 x NVIDIA H100")
    assert (whole.peak_allocated_mb, whole.peak_reserved_mb) == (3000.0, 3500.0)
    assert (whole.mean_utilization_percent, whole.peak_utilization_percent, whole.peak_nvml_memory_used_mb) == (
        60.0, 100.0, 32000.0)
    assert combine_gpus([a]) is a and not combine_gpus([]).available

    report = ResourceReport(1.0, 100.0, 50.0, gpu=whole, gpus=[a, b]).to_dict()
    text = gpu_markdown(SimpleNamespace(resources=report))
    rows = [line for line in text.splitlines() if line.startswith("| cuda:") or line.startswith("| **all**")]
    assert rows == ["| cuda:0 | NVIDIA H100 | 1000 | 1200 | 80 | 100 | 30000 |",
                    "| cuda:1 | NVIDIA H100 | 3000 | 3500 | 40 | 90 | 32000 |",
                    "| **all** |  | 3000 | 3500 | 60 | 100 | 32000 |"]
    one = gpu_markdown(SimpleNamespace(resources=ResourceReport(1.0, 1.0, 1.0, gpu=a, gpus=[a]).to_dict()))
    assert "| mean utilisation (%) | 80 |" in one and "cuda:1" not in one


def test_the_devices_a_run_watches(monkeypatch):
    monkeypatch.delenv(STAND_IN_GPUS_ENV, raising=False)
    if not torch.cuda.is_available():
        assert run_devices("auto") == ["cpu"]
        with pytest.raises(ModelError, match="CUDA"):
            run_devices("cuda")
    else:
        assert run_devices("cuda") == [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    monkeypatch.setenv(STAND_IN_GPUS_ENV, "2")
    assert run_devices("auto") == run_devices("cuda") == ["cpu"]  # stand-ins are the CPU, once
