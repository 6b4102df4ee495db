"""Resource monitoring: wall time, peak memory (RSS) per stage, and GPU use on every GPU the run uses.

A sampling thread reads the process's RSS (psutil) and, on CUDA machines with ``nvidia-ml-py``, each GPU's
utilisation and memory (NVML). Each sample is charged to every stage active at that moment, so overlapping
stages (decoding the next files while the model runs) each see the peak they lived through. A run with a model
worker per GPU is watched on each of them: ``ResourceReport.gpus`` has a ``GpuStats`` per device, ``gpu`` their
combination.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator, Sequence

import psutil

MB = 1024 * 1024


@dataclass
class GpuStats:
    """One GPU's figures over a run (``device``: e.g. ``cuda:1``), or several GPUs' combined (``combine_gpus``)."""

    available: bool
    device: str | None = None
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
    gpus: list[GpuStats] = field(default_factory=list)

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


def combine_gpus(stats: Sequence[GpuStats]) -> GpuStats:
    """The figures of several GPUs as one: peaks the largest of any GPU, the mean utilisation the mean of theirs
    (how busy the run kept its GPUs as a whole), the device names counted (``"2 x NVIDIA H100"``)."""
    if len(stats) == 1:
        return stats[0]
    if not stats:
        return GpuStats(available=False, note="CPU-only run: no GPU was used")
    names = Counter(s.device_name for s in stats)
    combined = GpuStats(available=True, device=", ".join(s.device or "?" for s in stats),
                        device_name=", ".join(f"{count} x {name}" for name, count in names.items()),
                        peak_allocated_mb=max(s.peak_allocated_mb or 0.0 for s in stats),
                        peak_reserved_mb=max(s.peak_reserved_mb or 0.0 for s in stats),
                        note=" ".join(dict.fromkeys(s.note for s in stats if s.note)))
    sampled = [s for s in stats if s.mean_utilization_percent is not None]
    if sampled:
        combined.mean_utilization_percent = sum(s.mean_utilization_percent for s in sampled) / len(sampled)
        combined.peak_utilization_percent = max(s.peak_utilization_percent for s in sampled)
        combined.peak_nvml_memory_used_mb = max(s.peak_nvml_memory_used_mb for s in sampled)
    return combined


@dataclass
class _GpuWatch:
    """What the sampling thread gathers of one CUDA device."""

    device: Any
    nvml: _Nvml
    utilisation: list[float] = field(default_factory=list)
    nvml_peak_mb: float = 0.0


class ResourceMonitor:
    """Use as a context manager around a run; ``stage(name)`` around each stage's work. ``devices``: the torch
    devices the run uses, or their names (one, or a list: every GPU its model workers run on); the CUDA ones are
    watched (torch is imported only for them)."""

    def __init__(self, devices: Any = None, interval_seconds: float = 0.1) -> None:
        self.interval = interval_seconds
        self.process = psutil.Process()
        listed = devices if isinstance(devices, (list, tuple)) else [devices]
        self.devices = [d for d in listed if d is not None]
        self._active: Counter[str] = Counter()
        self._peaks: dict[str, float] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._watches: list[_GpuWatch] = []
        self.peak_rss_mb = 0.0
        self.start_rss_mb = 0.0
        self._started = 0.0
        self.report: ResourceReport | None = None

    def _cuda_devices(self) -> list[Any]:
        return [d for d in self.devices if getattr(d, "type", str(d)).startswith("cuda")]

    def _sample(self) -> None:
        rss = self.process.memory_info().rss / MB
        with self._lock:
            self.peak_rss_mb = max(self.peak_rss_mb, rss)
            for stage in self._active:
                self._peaks[stage] = max(self._peaks.get(stage, 0.0), rss)
        for watch in self._watches:
            if (gpu := watch.nvml.sample()) is not None:
                watch.utilisation.append(gpu[0])
                watch.nvml_peak_mb = max(watch.nvml_peak_mb, gpu[1])

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> "ResourceMonitor":
        self._started = time.perf_counter()
        self.start_rss_mb = self.process.memory_info().rss / MB
        cuda = self._cuda_devices()
        if cuda:
            import torch

            for device in cuda:
                torch.cuda.reset_peak_memory_stats(device)
                self._watches.append(_GpuWatch(device, _Nvml(torch.device(device).index or 0)))
        self._thread = threading.Thread(target=self._loop, name="mess-ai-monitor", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()
        gpus = [self._gpu_stats(watch) for watch in self._watches]
        self.report = ResourceReport(
            wall_seconds=time.perf_counter() - self._started, peak_rss_mb=self.peak_rss_mb,
            start_rss_mb=self.start_rss_mb, peak_rss_mb_by_stage=dict(self._peaks), gpu=combine_gpus(gpus),
            gpus=gpus)

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

    @staticmethod
    def _gpu_stats(watch: _GpuWatch) -> GpuStats:
        import torch

        stats = GpuStats(
            available=True, device=str(watch.device), device_name=torch.cuda.get_device_name(watch.device),
            peak_allocated_mb=torch.cuda.max_memory_allocated(watch.device) / MB,
            peak_reserved_mb=torch.cuda.max_memory_reserved(watch.device) / MB)
        if watch.utilisation:
            stats.mean_utilization_percent = sum(watch.utilisation) / len(watch.utilisation)
            stats.peak_utilization_percent = max(watch.utilisation)
            stats.peak_nvml_memory_used_mb = watch.nvml_peak_mb
        else:
            stats.note = "NVML not available (install the gpu extra, nvidia-ml-py): no utilisation figures"
        return stats
