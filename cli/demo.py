"""The offline demo: a few synthetic recordings and a random-weight MERT-format model, through the real pipeline.

Everything it uses is the real code path (discovery, decoding, resampling, windowing, the native MERT loader,
the store); only the audio is synthetic and the model's weights are random, so the numbers show the shapes
and the plumbing, not musical meaning.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf

from mess_ai.store.atomic import load_npy

# name, seconds, sample rate, channels, fundamental (Hz), format
_DEMO_TRACKS = [
    ("strings/a_minor_drone.wav", 12.0, 44100, 2, 220.0, "WAV"),
    ("strings/e_major_drone.flac", 9.0, 48000, 1, 329.6, "FLAC"),
    ("piano/arpeggio.ogg", 7.5, 22050, 1, 261.6, "OGG"),
    ("piano/staccato.mp3", 6.0, 44100, 2, 392.0, "MP3"),
    ("percussion/noise_bursts.wav", 4.0, 16000, 1, 0.0, "WAV"),
]


def _synth(seconds: float, sample_rate: int, channels: int, fundamental: float, seed: int) -> np.ndarray:
    """float32 [n, channels]: a few harmonics with a slow tremolo, or noise bursts when ``fundamental`` is 0."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    if fundamental:
        x = sum(np.sin(2 * np.pi * fundamental * k * t) / k for k in range(1, 5))
        x *= 0.6 + 0.4 * np.sin(2 * np.pi * 0.5 * t)
    else:
        x = rng.standard_normal(len(t)) * (np.sin(2 * np.pi * 2 * t) > 0.6)
    x = 0.3 * x / np.max(np.abs(x))
    return np.stack([np.roll(x, 7 * c) for c in range(channels)], axis=1).astype(np.float32)


def write_demo_audio(folder: Path) -> list[Path]:
    """Write the demo recordings (and one broken file, to show how failures are recorded)."""
    paths = []
    subtypes = {"WAV": "PCM_16", "FLAC": "PCM_24", "OGG": "VORBIS", "MP3": "MPEG_LAYER_III"}
    for i, (name, seconds, rate, channels, f0, fmt) in enumerate(_DEMO_TRACKS):
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(str(path), _synth(seconds, rate, channels, f0, seed=i), rate, format=fmt, subtype=subtypes[fmt])
        paths.append(path)
    broken = folder / "broken" / "not_really_audio.wav"
    broken.parent.mkdir(parents=True, exist_ok=True)
    broken.write_text("this is a text file with a .wav name\n")
    paths.append(broken)
    return paths


def run_demo(workdir: Path) -> int:
    """Write the demo inputs (once) and extract them through the ``extract-features`` Prefect flow."""
    from cli.report import prefect_ui_hint, print_summary
    from deployments.runtime import default_gpu_limit
    from mess_ai.features.random_checkpoints import write_test_model
    from mess_ai.pipeline import FileOutcome, RunSummary
    from mess_ai.store import DONE, FeatureStore

    workdir = workdir.absolute()
    audio_dir, model_dir, store_dir = workdir / "audio", workdir / "model", workdir / "store"
    # A second demo run reuses the audio and the model, to show that unchanged files are skipped.
    if audio_dir.is_dir():
        print(f"1. Reusing the demo recordings in {audio_dir} (delete {workdir} to start over)")
    else:
        print(f"1. Writing synthetic demo recordings to {audio_dir}")
        write_demo_audio(audio_dir)
    if (model_dir / "config.json").exists():
        print(f"2. Reusing the tiny MERT-v1-format checkpoint with RANDOM weights in {model_dir}")
    else:
        print(f"2. Writing a tiny MERT-v1-format checkpoint with RANDOM weights to {model_dir}")
        write_test_model(model_dir, size="tiny")
    print("   (the real model is m-a-p/MERT-v1-95M; see the README for running with it)")
    print("3. Extracting features through the Prefect flow `extract-features` (what `mess-ai extract` runs)\n")
    from flows.extract import extract_features
    from mess_ai.config import ExtractConfig, RunOptions

    summary = RunSummary.from_dict(extract_features(
        audio_dir=str(audio_dir), store=str(store_dir), dataset="demo",
        config=ExtractConfig(model=str(model_dir), device="cpu"), run=RunOptions(gpu_limit=default_gpu_limit())))
    print_summary(summary)
    print(prefect_ui_hint())

    dataset_dir = store_dir / "demo"
    # From the manifest: a second demo run skips every file, and counts the unchanged ones without listing them.
    store = FeatureStore(store_dir, "demo")
    try:
        done = [FileOutcome(r["track_id"], r["relative_path"], DONE) for r in store.manifest.rows("demo", DONE)]
    finally:
        store.close()
    print(f"\n4. What is in the store ({dataset_dir}):")
    for outcome in done:
        segments = load_npy(dataset_dir / "segments" / f"{outcome.track_id}.npy")
        aggregated = load_npy(dataset_dir / "aggregated" / f"{outcome.track_id}.npy")
        print(f"   {outcome.relative_path:32s} segments {str(list(segments.shape)):14s} "
              f"aggregated {list(aggregated.shape)}  track_id {outcome.track_id}")
    print("   segments: [windows, hidden states (layer 0 = conv features, 1.. = transformer layers), hidden size]")
    if len(done) >= 2:
        vectors = np.stack([load_npy(dataset_dir / "aggregated" / f"{o.track_id}.npy")[-1] for o in done])
        unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
        print("   cosine similarity of the last layer's track embeddings (random weights: plumbing, not meaning):")
        for o, row in zip(done, unit @ unit.T):
            print(f"     {o.relative_path:32s} " + " ".join(f"{v:5.2f}" for v in row))
    print(f"\nThe broken file was recorded, not fatal: `mess-ai failures --store {store_dir}` lists it.")
    print(f"Check the store: `mess-ai check --store {store_dir}`. Provenance: {dataset_dir / 'provenance.json'}")
    expected_failures = 1
    ok = summary.done + summary.unchanged == len(_DEMO_TRACKS) and len(summary.failures) == expected_failures
    if not ok:
        print("demo: unexpected outcome (see above)")
    return 0 if ok else 1
