"""gpu (only where CUDA is present): throughput in bf16 and fp32 at several batch sizes, the flow end to end with
the share of its wall time the GPU is busy, and bf16 against fp32 embeddings (cosine >= 0.999 per layer).

Without CUDA it records "not run here: no CUDA" and measures nothing.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.common import add_figure, add_target, audio_set, checkpoint, new_result, run_flow, warm_up_flow
from bench.model_bound import premade_windows

NAME = "gpu"
BATCH_SIZES = (8, 16, 32, 64)
PRECISIONS = ("fp32", "bf16")
TARGET_COSINE = 0.999
COSINE_WINDOWS = 256


def layer_cosines(reference: np.ndarray, other: np.ndarray) -> np.ndarray:
    """Per layer, the lowest cosine over windows: reference, other float32 [n_windows, S, H] -> [S]."""
    dot = (reference * other).sum(axis=2)
    norms = np.linalg.norm(reference, axis=2) * np.linalg.norm(other, axis=2)
    return (dot / np.maximum(norms, 1e-12)).min(axis=0)


def measure(workdir: Path, device: str, quick: bool, result: dict[str, Any]) -> None:
    """Every figure of this benchmark on ``device`` (the benchmark calls it with CUDA only)."""
    from mess_ai.features.extractor import Extractor
    from mess_ai.features.loading import get_model

    size, files, seconds = ("tiny", 2, 20.0) if quick else ("base", 10, 180.0)
    batch_sizes = BATCH_SIZES[:2] if quick else BATCH_SIZES
    model_path = checkpoint(workdir, size)
    audio = audio_set(workdir, files, seconds)
    warm_up_flow(workdir)
    model = get_model(model_path, device=device)
    windows = premade_windows(audio, model.sampling_rate, 2.5)
    audio_seconds = files * seconds
    window_samples = windows.shape[1]

    for precision in PRECISIONS:
        for batch_size in batch_sizes:
            extractor = Extractor(model, window_samples, batch_size, precision)
            extractor.embed(windows[:batch_size])  # kernels chosen, memory pooled
            started = time.perf_counter()
            extractor.embed(windows)  # ends with a copy to the host: the device is done when it returns
            spent = time.perf_counter() - started
            add_figure(result, f"bare model, {precision}, batch {batch_size}", audio_seconds / spent,
                       "audio s per s")

    sample = windows[:COSINE_WINDOWS]
    fp32, _ = Extractor(model, window_samples, 32, "fp32").embed(sample)
    bf16, _ = Extractor(model, window_samples, 32, "bf16").embed(sample)
    cosines = layer_cosines(fp32, bf16)
    worst = int(cosines.argmin())
    add_figure(result, "bf16 vs fp32 cosine, lowest over windows and layers", float(cosines.min()), "cosine")
    add_target(result, f"bf16 vs fp32 cosine >= {TARGET_COSINE} per layer",
               f"lowest {cosines.min():.5f} (layer {worst})", bool(cosines.min() >= TARGET_COSINE),
               f"per-layer lowest cosines: {', '.join(f'{c:.5f}' for c in cosines)}")

    for precision in PRECISIONS:
        started = time.perf_counter()
        summary = run_flow(audio, workdir / "stores" / f"{NAME}-{precision}", model_path, dataset=NAME,
                           device=device, precision=precision)
        wall = time.perf_counter() - started
        gpu = summary["resources"].get("gpu", {})
        add_figure(result, f"flow end to end, {precision}", summary["audio_seconds"] / wall, "audio s per s")
        add_figure(result, f"flow, {precision}: share of wall time in model calls",
                   summary["stage_seconds"]["extract"] / wall, "ratio")
        add_figure(result, f"flow, {precision}: mean GPU utilisation (NVML)", gpu.get("mean_utilization_percent"),
                   "%")
    result["notes"] += [
        f"{files} files of {seconds:g} s (44.1 kHz stereo WAV), {len(windows)} windows of 5 s every 2.5 s; "
        f"checkpoint write_test_model(size={size!r}) (RANDOM weights: the cosine checks the arithmetic, not MERT's "
        "own weights).",
        "Bare model: Extractor.embed over pre-made windows (forward, pooling, copy to the host), after one warm-up "
        "batch. Flow: defaults (batch size 32 on CUDA), one run per precision into a new store.",
        "GPU busy share: time inside model calls over the flow's wall time, and NVML's mean utilisation when "
        "nvidia-ml-py is installed (the gpu extra).",
    ]


def run(workdir: Path, quick: bool) -> dict[str, Any]:
    result = new_result(NAME, quick)
    if not torch.cuda.is_available():
        add_target(result, "bf16 and fp32 throughput, GPU busy share, bf16 vs fp32 cosine >= 0.999 per layer",
                   "not run here: no CUDA", None, f"torch {torch.__version__} sees no CUDA device")
        result["notes"].append("not run here: no CUDA. Run `python -m bench gpu` on a CUDA machine "
                               "(`make install TORCH_SPEC=torch`, and the gpu extra for NVML figures).")
        return result
    measure(workdir, "cuda", quick, result)
    return result
