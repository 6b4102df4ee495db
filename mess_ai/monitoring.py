"""Resource monitoring: wall time, peak memory (RSS) per stage, and GPU use when there is a GPU.

A sampling thread reads the process's RSS (psutil) and, on CUDA machines with ``nvidia-ml-py``, the GPU's
utilisation and memory (NVML). Each sample is charged to every stage active at that moment, so overlapping
stages (decoding the next files while the model runs) each see the peak they lived through.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator

import psutil

MB = 1024 * 1024


@dataclass
class GpuStats:
    available: bool
    device_name: str | None = None
    peak_allocated_mb: float | None = None
    peak_reserved_mb: float | None = None
    mean_utilization_percent: float | None = None
    peak_utilization_percent: float | None = None
    peak_nvml_memory_used_mb: float | None = None
    note: str = ""


@dataclass
class ResourceReport:
    wall_seconds: float
    peak_rss_mb: float
    start_rss_mb: float
    peak_rss_mb_by_stage: dict[str, float] = field(default_factory=dict)
    gpu: GpuStats = field(default_factory=lambda: GpuStats(available=False))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Nvml:
    """NVML access for one CUDA device, or nothing when pynvml or the driver is missing."""

    def __init__(self, index: int) -> None:
        self.handle = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            self._pynvml = pynvml
        except Exception:  # noqa: BLE001 - no NVML means no utilisation figures, nothing worse
            self.handle = None

    def sample(self) -> tuple[float, float] | None:
        if self.handle is None:
            return None
        try:
            util = self._pynvml.nvmlDeviceGetUtilizationRates(self.handle).gpu
            used = self._pynvml.nvmlDeviceGetMemoryInfo(self.handle).used / MB
        except Exception:  # noqa: BLE001
            return None
        return float(util), float(used)


class ResourceMonitor:
    """Use as a context manager around a run; ``stage(name)`` around each stage's work."""

    def __init__(self, device: Any = None, interval_seconds: float = 0.1) -> None:
        self.interval = interval_seconds
        self.process = psutil.Process()
        self.device = device
        self._active: Counter[str] = Counter()
        self._peaks: dict[str, float] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._nvml: _Nvml | None = None
        self._util: list[float] = []
        self._nvml_peak_mb = 0.0
        self.peak_rss_mb = 0.0
        self.start_rss_mb = 0.0
        self._started = 0.0
        self.report: ResourceReport | None = None

    def _cuda(self) -> bool:
        return self.device is not None and getattr(self.device, "type", str(self.device)).startswith("cuda")

    def _sample(self) -> None:
        rss = self.process.memory_info().rss / MB
        with self._lock:
            self.peak_rss_mb = max(self.peak_rss_mb, rss)
            for stage in self._active:
                self._peaks[stage] = max(self._peaks.get(stage, 0.0), rss)
        if self._nvml is not None and (gpu := self._nvml.sample()) is not None:
            self._util.append(gpu[0])
            self._nvml_peak_mb = max(self._nvml_peak_mb, gpu[1])

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> "ResourceMonitor":
        self._started = time.perf_counter()
        self.start_rss_mb = self.process.memory_info().rss / MB
        if self._cuda():
            import torch

            torch.cuda.reset_peak_memory_stats(self.device)
            self._nvml = _Nvml(self.device.index or 0)
        self._thread = threading.Thread(target=self._loop, name="mess-ai-monitor", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()
        self.report = ResourceReport(
            wall_seconds=time.perf_counter() - self._started, peak_rss_mb=self.peak_rss_mb,
            start_rss_mb=self.start_rss_mb, peak_rss_mb_by_stage=dict(self._peaks), gpu=self._gpu_stats())

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        with self._lock:
            self._active[name] += 1
        try:
            self._sample()
            yield
        finally:
            self._sample()
            with self._lock:
                self._active[name] -= 1
                if not self._active[name]:
                    del self._active[name]

    def _gpu_stats(self) -> GpuStats:
        if not self._cuda():
            return GpuStats(available=False, note="CPU-only run: no GPU was used")
        import torch

        stats = GpuStats(
            available=True, device_name=torch.cuda.get_device_name(self.device),
            peak_allocated_mb=torch.cuda.max_memory_allocated(self.device) / MB,
            peak_reserved_mb=torch.cuda.max_memory_reserved(self.device) / MB)
        if self._util:
            stats.mean_utilization_percent = sum(self._util) / len(self._util)
            stats.peak_utilization_percent = max(self._util)
            stats.peak_nvml_memory_used_mb = self._nvml_peak_mb
        else:
            stats.note = "NVML not available (install the gpu extra, nvidia-ml-py): no utilisation figures"
        return stats
