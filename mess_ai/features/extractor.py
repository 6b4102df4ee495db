"""Extraction: equal-length windows batched across files through the model, pooled per window.

Outputs per track (``S`` hidden states, ``H`` hidden size, ``T`` frames per window):
- ``segments``: float32 [n_windows, S, H], the mean over each window's frames;
- ``aggregated``: float32 [S, H], the mean over all windows and frames;
- ``raw`` (only when asked): float16 [n_windows, S, T, H], handed window by window to a callback so that
  hours of audio never have to fit in memory.

Only windows of identical length share a batch: MERT's first conv layer uses group norm over time, so
zero-padding would change the embeddings of the padded windows. The same group norm normalises each window on its
own, which lets ``LoadedModel.hidden_states`` run the convolutional front end one window at a time: its first
layers' outputs were the pipeline's memory peak (see ``mess_ai.features.loaded.hubert_hidden_states``).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

import numpy as np

from mess_ai.features.loaded import LoadedModel

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = {"cuda": 32, "mps": 8, "cpu": 4}
PRECISIONS = ("auto", "fp32", "bf16")


def resolve_precision(precision: str, device: torch.device | str, dataset_precision: str | None = None) -> str:
    """The precision a run uses. ``auto`` is the dataset's own precision when it has features already (a CPU
    worker joining a GPU pool, or a laptop run on a store built on a GPU, runs bf16 autocast on the CPU rather
    than re-extract the dataset in fp32), else bf16 autocast on CUDA and fp32 elsewhere. ``device``: a torch
    device or its type ('cuda', 'cpu'), which is all that decides."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        if dataset_precision in PRECISIONS and dataset_precision != "auto":
            return dataset_precision
        return "bf16" if getattr(device, "type", device) == "cuda" else "fp32"
    return precision


def precision_problem(precision: str, device: torch.device) -> str | None:
    """Why ``device`` cannot run ``precision`` (a tiny autocast product fails), or None when it can."""
    if precision != "bf16":
        return None
    import torch

    try:
        with torch.inference_mode(), torch.autocast(device_type=device.type, dtype=torch.bfloat16):
            torch.ones(2, 2, device=device) @ torch.ones(2, 2, device=device)
    except Exception as exc:  # noqa: BLE001 - any failure means the same: not here
        return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return None


def default_batch_size(device: torch.device) -> int:
    return DEFAULT_BATCH_SIZE.get(device.type, 4)


@dataclass(eq=False)
class TrackJob:
    """One track on its way through the model.

    ``signal``: float32 [n_samples] at the model's rate; ``bounds``: (start, length) of each window.
    ``context`` is the caller's, carried through untouched.
    """

    track_id: str
    signal: np.ndarray
    bounds: list[tuple[int, int]]
    context: Any = None
    segments: np.ndarray | None = None
    error: BaseException | None = None
    windows_done: int = 0
    model_seconds: float = 0.0

    @property
    def n_windows(self) -> int:
        return len(self.bounds)

    @property
    def complete(self) -> bool:
        return self.error is not None or self.windows_done == self.n_windows

    def aggregated(self) -> np.ndarray:
        """float32 [S, H]: the mean over all windows and frames (every window of a track has as many frames)."""
        if self.segments is None:
            raise ValueError(f"track {self.track_id} has no segments yet")
        return self.segments.astype(np.float64).mean(axis=0).astype(np.float32)


RawCallback = Callable[[TrackJob, int, np.ndarray], None]


@dataclass
class ExtractorStats:
    windows: int = 0
    batches: int = 0
    model_seconds: float = 0.0
    batch_size_reductions: list[int] = field(default_factory=list)
    first_batch_at: float | None = None  # time.time() when the first batch entered the model


class Extractor:
    """Runs windows through a loaded model in batches of equal-length windows, across files."""

    def __init__(self, model: LoadedModel, window_samples: int, batch_size: int | None = None,
                 precision: str = "auto", keep_raw: bool = False) -> None:
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch size must be at least 1, got {batch_size}")
        self.model = model
        self.window_samples = window_samples
        self.batch_size = batch_size or default_batch_size(model.device)
        self.precision = resolve_precision(precision, model.device)
        self.keep_raw = keep_raw
        self.stats = ExtractorStats()

    # --- one batch -----------------------------------------------------------------------------------
    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == "bf16":
            import torch

            return torch.autocast(device_type=self.model.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _forward(self, windows: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        import torch

        device = self.model.device
        batch = torch.from_numpy(windows)
        batch = batch.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else batch.to(device)
        with torch.inference_mode(), self._autocast():
            states = self.model.hidden_states(self.model.prepare(batch))  # [B, S, T, H]
            segments = states.float().mean(dim=2).cpu().numpy()
            raw = states.to(torch.float16).cpu().numpy() if self.keep_raw else None
        return segments, raw

    def embed(self, windows: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """windows: float32 [B, L] of one length → (segments float32 [B, S, H], raw float16 [B, S, T, H] | None).

        On CUDA out-of-memory the batch size is halved and the work goes on; at batch size 1 the error stands.
        """
        import torch

        while True:
            try:
                parts = [self._forward(windows[i:i + self.batch_size])
                         for i in range(0, len(windows), self.batch_size)]
                break
            except torch.OutOfMemoryError:
                if self.batch_size == 1:
                    raise
                self.batch_size = max(1, self.batch_size // 2)
                self.stats.batch_size_reductions.append(self.batch_size)
                log.warning("Out of GPU memory: lowering the batch size to %d and trying again.", self.batch_size)
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
        segments = np.concatenate([p[0] for p in parts])
        raw = np.concatenate([p[1] for p in parts]) if self.keep_raw else None
        return segments, raw

    # --- many tracks ---------------------------------------------------------------------------------
    def _run_batch(self, items: list[tuple[TrackJob, int]], on_raw: RawCallback | None) -> None:
        live = [(job, i) for job, i in items if job.error is None]
        if not live:
            return
        windows = np.stack([job.signal[job.bounds[i][0]:job.bounds[i][0] + job.bounds[i][1]] for job, i in live])
        if self.stats.first_batch_at is None:
            self.stats.first_batch_at = time.time()
        started = time.perf_counter()
        try:
            segments, raw = self.embed(windows)
        except Exception as exc:  # noqa: BLE001 - recorded against each track of the batch
            for job, _ in live:
                job.error = exc
            return
        elapsed = time.perf_counter() - started
        self.stats.windows += len(live)
        self.stats.batches += 1
        self.stats.model_seconds += elapsed
        for row, (job, i) in enumerate(live):
            if job.segments is None:
                job.segments = np.empty((job.n_windows, *segments.shape[1:]), dtype=np.float32)
            job.segments[i] = segments[row]
            if raw is not None and on_raw is not None:
                try:
                    on_raw(job, i, raw[row])
                except Exception as exc:  # noqa: BLE001 - a failed raw write fails that track only
                    job.error = exc
            job.windows_done += 1
            job.model_seconds += elapsed / len(live)

    def run(self, jobs: Iterable[TrackJob], on_raw: RawCallback | None = None) -> Iterator[TrackJob]:
        """Yield each job once all its windows are through the model (or it failed: ``job.error``).

        Full-length windows wait in one queue until a batch is full, so windows of consecutive files share
        batches; a file shorter than one window has a single window of its own length and runs alone.
        Jobs are yielded in the order they complete.
        """
        for finished in self.run_batches(jobs, on_raw):
            yield from finished

    def run_batches(self, jobs: Iterable[TrackJob], on_raw: RawCallback | None = None) -> Iterator[list[TrackJob]]:
        """As ``run``, the jobs that complete together yielded together: those a batch completed (short files
        share batches, up to ``batch_size`` of them), for the caller to write in one go."""
        queue: deque[tuple[TrackJob, int]] = deque()
        waiting: deque[TrackJob] = deque()

        def finished() -> Iterator[list[TrackJob]]:
            done = []
            while waiting and waiting[0].complete:
                done.append(waiting.popleft())
            if done:
                yield done

        for job in jobs:
            if job.n_windows == 0:
                raise ValueError(f"track {job.track_id} has no windows")
            waiting.append(job)
            if any(length != self.window_samples for _, length in job.bounds):
                self._run_batch([(job, i) for i in range(job.n_windows)], on_raw)
            else:
                queue.extend((job, i) for i in range(job.n_windows))
                while len(queue) >= self.batch_size:
                    self._run_batch([queue.popleft() for _ in range(self.batch_size)], on_raw)
            yield from finished()
        while queue:
            self._run_batch([queue.popleft() for _ in range(min(self.batch_size, len(queue)))], on_raw)
            yield from finished()
        yield from finished()
