"""gpu: one short script for a lent CUDA machine (<= 8 minutes): bf16 and fp32 throughput of the model at several
batch sizes, the pipeline with 0, 2 and 4 decode workers and the share of its wall time the GPU is busy, and bf16
against fp32 embeddings per layer (cosine >= 0.999).

The pipeline runs are plain Python (``run_extraction``: the same stages as the flow, no Prefect), so the script needs
only torch, numpy, soundfile, soxr, safetensors, SQLAlchemy and pydantic on the GPU machine; the flow itself runs
once more when Prefect is installed there. Each part starts only while the time budget leaves room for it; a part
left out is said so in the results. Without CUDA it records "not run here: no CUDA" and measures nothing.

On a lent machine (no network there: the packages its image lacks travel as wheels, 8.4 MB):
  here:  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
           --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl -r bench/gpu-requirements.txt
  there: python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && \
           PYTHONPATH=/tmp/site:. python3 -m bench gpu --results $OUT
then copy ``gpu.json`` into ``bench/results/`` here and run ``python -m bench.report`` to put its figures into
docs/benchmarks.md.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.common import add_figure, add_target, audio_set, checkpoint, new_result
from bench.model_bound import premade_windows

NAME = "gpu"
BATCH_SIZES = (8, 16, 32, 64)
PRECISIONS = ("bf16", "fp32")
DECODE_WORKERS = (0, 2, 4)
TARGET_COSINE = 0.999
COSINE_WINDOWS = 256
# The whole script, the audio and the checkpoint written and the model loaded included.
BUDGET_SECONDS = 8 * 60.0


class Budget:
    """What is left of the script's time; a part starts only when the time it is expected to take is left."""

    def __init__(self, seconds: float) -> None:
        self.ends = time.perf_counter() + seconds
        self.skipped: list[str] = []

    def allows(self, part: str, expected_seconds: float) -> bool:
        if time.perf_counter() + expected_seconds <= self.ends:
            return True
        self.skipped.append(part)
        return False


def layer_cosines(reference: np.ndarray, other: np.ndarray) -> np.ndarray:
    """Per layer, the lowest cosine over windows: reference, other float32 [n_windows, S, H] -> [S]."""
    dot = (reference * other).sum(axis=2)
    norms = np.linalg.norm(reference, axis=2) * np.linalg.norm(other, axis=2)
    return (dot / np.maximum(norms, 1e-12)).min(axis=0)


def busy_share(model_work: list[tuple[float, float, str]], wall_seconds: float) -> float:
    """Share of ``wall_seconds`` covered by the union of the model-work intervals (wall-clock start, end)."""
    busy, reach = 0.0, float("-inf")
    for start, end, _device in sorted(model_work):
        if end > reach:
            busy += end - max(start, reach)
            reach = end
    return busy / wall_seconds if wall_seconds > 0 else 0.0


def bare_throughput(model: Any, windows: np.ndarray, audio_seconds: float, batch_sizes: tuple[int, ...],
                    budget: Budget, result: dict[str, Any]) -> None:
    """The model alone (``Extractor.embed``: forward, pooling, copy to the host) on pre-made windows."""
    from mess_ai.features.extractor import Extractor

    for precision in PRECISIONS:
        for batch_size in batch_sizes:
            if not budget.allows(f"bare model, {precision}, batch {batch_size}", 20.0):
                continue
            extractor = Extractor(model, windows.shape[1], batch_size, precision)
            extractor.embed(windows[:batch_size])  # kernels chosen, memory pooled
            started = time.perf_counter()
            extractor.embed(windows)  # ends with a copy to the host: the device is done when it returns
            spent = time.perf_counter() - started
            add_figure(result, f"bare model, {precision}, batch {batch_size}", audio_seconds / spent,
                       "audio s per s")


def precision_agreement(model: Any, windows: np.ndarray, budget: Budget, result: dict[str, Any]) -> None:
    from mess_ai.features.extractor import Extractor

    if not budget.allows("bf16 vs fp32 cosine", 20.0):
        add_target(result, f"bf16 vs fp32 cosine >= {TARGET_COSINE} per layer", "not measured: out of time", None)
        return
    sample = windows[:COSINE_WINDOWS]
    fp32, _ = Extractor(model, windows.shape[1], 32, "fp32").embed(sample)
    bf16, _ = Extractor(model, windows.shape[1], 32, "bf16").embed(sample)
    cosines = layer_cosines(fp32, bf16)
    worst = int(cosines.argmin())
    add_figure(result, "bf16 vs fp32 cosine, lowest over windows and layers", float(cosines.min()), "cosine")
    add_target(result, f"bf16 vs fp32 cosine >= {TARGET_COSINE} per layer",
               f"lowest {cosines.min():.5f} (layer {worst})", bool(cosines.min() >= TARGET_COSINE),
               f"per-layer lowest cosines over {len(sample)} windows: {', '.join(f'{c:.5f}' for c in cosines)}")


def pipeline_runs(audio: Path, model_path: str, workdir: Path, device: str, budget: Budget,
                  result: dict[str, Any], expected_seconds: float) -> None:
    """The plain-Python pipeline per precision and decode-worker count, each into a new store: throughput, the
    share of its wall time inside model calls, NVML's mean utilisation."""
    from mess_ai.config import ExtractConfig
    from mess_ai.pipeline import run_extraction

    for precision in PRECISIONS:
        for workers in DECODE_WORKERS:
            label = f"pipeline, {precision}, {workers} decode workers"
            if not budget.allows(label, expected_seconds):
                continue
            config = ExtractConfig(model=model_path, device=device, precision=precision)
            started = time.perf_counter()
            summary = run_extraction(audio, workdir / "stores" / f"{NAME}-{precision}-{workers}", dataset=NAME,
                                     config=config, decode_workers=workers)
            wall = time.perf_counter() - started
            if summary.failed:
                raise RuntimeError(f"{label}: {summary.failed} files failed: {summary.failures[:3]}")
            gpu = summary.resources.get("gpu", {})
            add_figure(result, f"{label}: throughput", summary.audio_seconds / wall, "audio s per s")
            add_figure(result, f"{label}: share of wall time the model is busy",
                       busy_share(summary.model_work, summary.wall_seconds), "ratio")
            add_figure(result, f"{label}: mean GPU utilisation (NVML)", gpu.get("mean_utilization_percent"), "%")


def flow_run(audio: Path, model_path: str, workdir: Path, device: str, budget: Budget,
             result: dict[str, Any], expected_seconds: float) -> None:
    """The flow once (bf16, its default decode workers), where Prefect is installed."""
    try:
        import prefect  # noqa: F401
    except ImportError:
        result["notes"].append("The flow was not run: Prefect is not installed on this machine (the pipeline runs "
                               "above are the flow's stages in plain Python).")
        return
    if not budget.allows("flow, bf16", expected_seconds + 30.0):
        return
    from bench.common import run_flow, warm_up_flow

    warm_up_flow(workdir)
    started = time.perf_counter()
    summary = run_flow(audio, workdir / "stores" / f"{NAME}-flow", model_path, dataset=NAME, device=device,
                       precision="bf16")
    wall = time.perf_counter() - started
    add_figure(result, "flow, bf16, default decode workers: throughput", summary["audio_seconds"] / wall,
               "audio s per s")
    add_figure(result, "flow, bf16: share of wall time the model is busy",
               busy_share([tuple(w) for w in summary["model_work"]], wall), "ratio")


def measure(workdir: Path, device: str, quick: bool, result: dict[str, Any]) -> None:
    """Every figure of this benchmark on ``device`` (the benchmark calls it with CUDA only; it runs on the CPU too,
    with ``quick``, to try the script before a GPU is lent)."""
    from mess_ai.features.loading import get_model

    budget = Budget(BUDGET_SECONDS)
    size, files, seconds = ("tiny", 2, 20.0) if quick else ("base", 20, 180.0)
    batch_sizes = BATCH_SIZES[:2] if quick else BATCH_SIZES
    model_path = checkpoint(workdir, size)
    audio = audio_set(workdir, files, seconds)
    model = get_model(model_path, device=device)
    windows = premade_windows(audio, model.sampling_rate, 2.5)
    audio_seconds = files * seconds

    started = time.perf_counter()
    bare_throughput(model, windows, audio_seconds, batch_sizes, budget, result)
    precision_agreement(model, windows, budget, result)
    # A pipeline run decodes the whole set on the CPU: a minute per audio hour on one core at worst.
    expected = 5.0 + audio_seconds / 60.0 + (time.perf_counter() - started) / 4
    pipeline_runs(audio, model_path, workdir, device, budget, result, expected)
    flow_run(audio, model_path, workdir, device, budget, result, expected)

    result["notes"] += [
        f"{files} files of {seconds:g} s (44.1 kHz stereo 16-bit WAV), {len(windows)} windows of 5 s every 2.5 s; "
        f"checkpoint write_test_model(size={size!r}) (RANDOM weights: the cosine checks the arithmetic, not MERT's "
        "own weights); device {device}.",
        "Bare model: Extractor.embed over pre-made windows (forward, pooling, copy to the host), after one warm-up "
        "batch. Pipeline: run_extraction with the config's defaults (batch size 32 on CUDA), one run per precision "
        "and decode-worker count, each into a new store (so every file is decoded and extracted).",
        "Busy share: the union of the model-call intervals over the run's wall time; NVML's mean utilisation when "
        "nvidia-ml-py is installed.",
    ]
    if budget.skipped:
        result["notes"].append(f"Left out for the {BUDGET_SECONDS / 60:g}-minute budget: "
                               f"{', '.join(budget.skipped)}.")


def run(workdir: Path, quick: bool) -> dict[str, Any]:
    result = new_result(NAME, quick)
    if not torch.cuda.is_available():
        add_target(result, "bf16 and fp32 throughput, 0/2/4 decode workers, GPU busy share, bf16 vs fp32 cosine "
                           ">= 0.999 per layer", "not run here: no CUDA", None,
                   f"torch {torch.__version__} sees no CUDA device: the script is ready and unrun")
        result["notes"].append("not run here: no CUDA. On a CUDA machine: `python -m bench gpu --results DIR` "
                               "(at most 8 minutes; see the module's docstring).")
        return result
    measure(workdir, "cuda", quick, result)
    return result
