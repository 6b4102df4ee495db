"""memory: one 60-minute file with default outputs; peak RSS above the loaded model <= 1.0 GB, decoding in the run's
process (0 decode workers, the default on a CPU) and with 2 decode workers (a GPU host's way), whose RSS counts too.

Measured in a fresh process per way, so nothing an earlier benchmark allocated hides in its heap. The process loads the
full-size model, notes its RSS, and runs the flow over the file with the memory probe: the real model for the
file's first batches, zeros (like the overhead probe) after them. Those real batches run while the pipeline holds
the whole decoded hour and its segments, which is when a real run's model working set meets the pipeline's
largest buffers; running every batch through the model would take over an hour on a CPU and change nothing else.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bench.common import add_figure, add_target, audio_set, checkpoint, new_result
from bench.probe import OverheadProbeModel, conv_frames

NAME = "memory"
TARGET_BYTES = 1e9
REAL_BATCHES = 2
WORKER_COUNTS = (0, 2)
WORKER_MODULE = "mess_ai.audio.decode_worker"


@dataclass(frozen=True)
class MemoryProbeModel(OverheadProbeModel):
    """The memory probe: ``real_model``'s hidden states for the first ``real_batches`` calls (the forward a real run
    makes: the front end one window at a time), the overhead probe's zeros after."""

    real_model: Any = None
    real_batches: int = 0
    calls: list[int] = field(default_factory=lambda: [0])

    def hidden_states(self, input_values: torch.Tensor) -> torch.Tensor:
        if self.calls[0] < self.real_batches:
            self.calls[0] += 1
            return self.real_model.hidden_states(input_values)
        return super().hidden_states(input_values)


class _WorkersRss(threading.Thread):
    """Samples, every 20 ms, the RSS of this process plus that of its decode workers (the run's ResourceMonitor
    sees its own process only): the peak of the sum, and of the workers alone."""

    def __init__(self) -> None:
        super().__init__(name="bench-workers-rss", daemon=True)
        self.peak_total_mb = self.peak_workers_mb = 0.0
        self._done = threading.Event()

    def run(self) -> None:
        import psutil

        me = psutil.Process()
        workers: dict[int, Any] = {}
        while not self._done.wait(0.02):
            for child in me.children(recursive=True):
                if child.pid not in workers:
                    try:
                        if WORKER_MODULE in child.cmdline():
                            workers[child.pid] = child
                    except psutil.Error:
                        continue
            total = 0.0
            for pid, worker in list(workers.items()):
                try:
                    total += worker.memory_info().rss / 2**20
                except psutil.Error:
                    del workers[pid]  # exited
            self.peak_workers_mb = max(self.peak_workers_mb, total)
            self.peak_total_mb = max(self.peak_total_mb, total + me.memory_info().rss / 2**20)

    def stop(self) -> None:
        self._done.set()
        self.join()


def _measure(workdir: Path, model_path: str, audio: Path, decode_workers: int, connection: Any) -> None:
    """In the fresh process: load the model, then run the flow over ``audio`` under 20 ms RSS samplers."""
    from bench.common import flow_model_loader, prepare_environment, rss_mb, run_flow, warm_up_flow

    prepare_environment()  # its own Prefect home and API: nothing here has imported Prefect yet
    from mess_ai.audio import WindowSpec, window_bounds
    from mess_ai.features.extractor import default_batch_size
    from mess_ai.features.loaded import LoadedModel
    from mess_ai.features.loading import get_model
    from mess_ai.monitoring import ResourceMonitor

    warm_up_flow(workdir)  # imports and Prefect's first-run allocations are not the pipeline's
    real = get_model(model_path, device="cpu")
    probe = MemoryProbeModel(**{f.name: getattr(real, f.name) for f in dataclasses.fields(LoadedModel)},
                             real_model=real, real_batches=REAL_BATCHES)
    loaded_mb = rss_mb()
    monitor = ResourceMonitor(interval_seconds=0.02)
    with_workers = _WorkersRss()
    with_workers.start()
    with flow_model_loader(lambda *args, **kwargs: probe), monitor:
        summary = run_flow(audio, workdir / "store", model_path, dataset=NAME, decode_workers=decode_workers)
    with_workers.stop()

    rate, config = real.sampling_rate, real.model.config
    windows = len(window_bounds(round(summary["audio_seconds"] * rate), rate, WindowSpec()))
    batch_size = default_batch_size(real.device)
    first_conv_frames = conv_frames(5 * rate, tuple(config.conv_kernel[:1]), tuple(config.conv_stride[:1]))
    connection.send({"loaded_mb": loaded_mb, "peak_mb": max(monitor.report.peak_rss_mb, with_workers.peak_total_mb),
                     "peak_workers_mb": with_workers.peak_workers_mb, "summary": summary,
                     "real_batches_run": probe.calls[0], "batch_size": batch_size,
                     "first_conv_bytes": config.conv_dim[0] * first_conv_frames * 4,
                     "segments_bytes": windows * real.num_hidden_states * real.hidden_size * 4})
    connection.close()


def _measured(workdir: Path, model_path: str, audio: Path, decode_workers: int) -> dict[str, Any]:
    context = multiprocessing.get_context("spawn")
    receiver, sender = context.Pipe(duplex=False)
    child = context.Process(target=_measure, args=(workdir / f"{NAME}-{decode_workers}", model_path, audio,
                                                   decode_workers, sender))
    child.start()
    sender.close()
    try:
        measured = receiver.recv()
    except EOFError:
        child.join()
        raise RuntimeError(f"the measuring process died (exit code {child.exitcode})") from None
    child.join()
    if measured["summary"]["done"] != 1:
        raise RuntimeError(f"the flow did not extract the file: {measured['summary']['outcomes']}")
    return measured


def run(workdir: Path, quick: bool) -> dict[str, Any]:
    result = new_result(NAME, quick)
    size, seconds = ("tiny", 120.0) if quick else ("base", 3600.0)
    model_path = checkpoint(workdir, size)
    audio = audio_set(workdir, 1, seconds)
    runs = {workers: _measured(workdir, model_path, audio, workers) for workers in WORKER_COUNTS}
    measured = runs[0]
    summary = measured["summary"]
    loaded, peak = measured["loaded_mb"], measured["peak_mb"]
    by_stage = summary["resources"]["peak_rss_mb_by_stage"]
    above = peak - loaded
    add_figure(result, "RSS with the model loaded (before the run)", loaded, "MiB")
    add_figure(result, "peak RSS during the run", peak, "MiB")
    add_figure(result, "peak RSS above the loaded model", above, "MiB")
    for stage in ("preprocess", "extract", "write"):
        if stage in by_stage:
            add_figure(result, f"peak above the loaded model while in stage {stage}", by_stage[stage] - loaded,
                       "MiB")
    aboves = {0: above}
    for workers in WORKER_COUNTS[1:]:
        other = runs[workers]
        aboves[workers] = other["peak_mb"] - other["loaded_mb"]
        add_figure(result, f"with {workers} decode workers: peak RSS of the run's process and its workers, above "
                           "the loaded model", aboves[workers], "MiB")
        add_figure(result, f"with {workers} decode workers: peak RSS of the workers alone", other["peak_workers_mb"],
                   "MiB")
    decoded = summary["audio_seconds"] * 24000 * 4 / 2**20
    segments = measured["segments_bytes"] / 2**20
    first_conv = measured["first_conv_bytes"] / 2**20
    worst = max(aboves.values())
    add_target(result, f"peak RSS above the loaded model <= {TARGET_BYTES / 1e9:g} GB",
               ", ".join(f"{aboves[w] * 2**20 / 1e9:.2f} GB with {w} decode workers" for w in WORKER_COUNTS),
               worst * 2**20 <= TARGET_BYTES,
               f"while the model runs, the pipeline holds the decoded file ({decoded:.0f} MiB, float32 at 24 kHz) and "
               f"its segments ({segments:.0f} MiB); the model's front end runs one window at a time, its first "
               f"convolution and group norm outputting {first_conv:.0f} MiB each per window (x "
               f"{measured['batch_size']} for the whole batch at once), and the transformer runs on the batch; with "
               "workers, a worker holds the decoded file while it copies it into shared memory, which the run's "
               "process then maps (no copy)")
    result["notes"] += [
        f"One {seconds / 60:g}-minute 44.1 kHz stereo 16-bit WAV, default outputs (segments + aggregated), flow "
        "defaults (batch size 4 on the CPU).",
        f"Checkpoint: write_test_model(size={size!r}); its first {measured['real_batches_run']} batches ran through "
        "it, the rest through zeros (see the module docstring for why that finds the same peak).",
        "RSS sampled every 20 ms in a fresh process per way; 'loaded' is after Prefect's start, one warm-up flow run "
        "and the model load. With decode workers, the peak is of the sum of the run's process's RSS and its "
        "workers' (sampled together), so memory a worker holds counts; a shared-memory segment between the "
        "worker's unmapping and the run's mapping of it (a moment) is in neither. GB = 1e9 bytes, MiB = 2**20 "
        "bytes.",
    ]
    result["details"] = {"loaded_mb": loaded, "peak_mb": peak, "peak_rss_mb_by_stage": by_stage,
                         "audio_seconds": summary["audio_seconds"], "checkpoint_size": size,
                         "by_decode_workers": {str(w): {k: v for k, v in runs[w].items() if k != "summary"}
                                               for w in WORKER_COUNTS}}
    return result
