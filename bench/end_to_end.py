"""end-to-end: `mess-ai extract` as a user runs it, against a running Prefect server, start included.

Side by side in one run: the command as a subprocess (its whole wall clock: Python's start, imports, the Prefect
client, the model load, the flow run) over 6 minutes of music-like audio with a full-size checkpoint, against a bare
loop calling the model on the same windows (model load excluded, same batch size and precision), split in halves
before and after the command (A-B-A, as model-bound does). Then the same command again over the unchanged folder.

Targets: the command's throughput >= 0.92 x the bare loop's; its first window reaches the model <= 3 s plus the model
load after it starts; a run with nothing new ends within 2 s, without loading the model or starting a flow run.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import soundfile as sf

from bench.common import SOURCE_CHANNELS, SOURCE_RATE, add_figure, add_target, checkpoint, new_result
from bench.model_bound import bare_loop, premade_windows
from tests.helpers.prefect_server import PREFECT, REPO_ROOT, SERVER_SETTINGS, free_port, start, stop, wait_healthy

NAME = "end-to-end"
TARGET_RATIO = 0.92
TARGET_FIRST_WINDOW_SECONDS = 3.0
TARGET_NOOP_SECONDS = 2.0
# As in model-bound: 5 s windows every 5 s, half the model work of the default hop, so a full-size model on a 2-core
# CPU stays within the benchmark's time. The fixed start weighs more against less model work, not less.
HOP_SECONDS = 5.0
FILES, FILE_SECONDS = 4, 90.0  # 6 minutes of audio
QUICK_FILES, QUICK_FILE_SECONDS = 2, 8.0

# MIDI note numbers of a few chord progressions (semitones above the key's root), four beats a chord.
_PROGRESSIONS = ([0, 7, 9, 5], [0, 5, 7, 7], [9, 5, 0, 7], [0, 3, 8, 10])


def _note(freq: float, seconds: float, amplitudes: np.ndarray, decay: float, attack: float = 0.005) -> np.ndarray:
    """float64 [samples]: one note, its harmonics weighted by ``amplitudes``, attack then exponential decay."""
    t = np.arange(int(seconds * SOURCE_RATE)) / SOURCE_RATE
    harmonics = np.arange(1, len(amplitudes) + 1)
    keep = harmonics * freq < SOURCE_RATE / 2.2
    wave = np.sin(2 * np.pi * freq * t[:, None] * harmonics[keep]) @ amplitudes[keep]
    envelope = np.minimum(t / attack, 1.0) * np.exp(-t / decay) * np.minimum((t[-1] - t) / 0.01 + 1e-9, 1.0)
    return wave * envelope


def _hit(kind: str, rng: np.random.Generator) -> np.ndarray:
    """float64 [samples]: a kick (falling sine), a snare (noise and a tone) or a hi-hat (differenced noise)."""
    t = np.arange(int(0.3 * SOURCE_RATE)) / SOURCE_RATE
    if kind == "kick":
        return np.sin(2 * np.pi * (50 * t + 100 * 0.04 * (1 - np.exp(-t / 0.04)))) * np.exp(-t / 0.12)
    noise = rng.standard_normal(len(t))
    if kind == "snare":
        return (0.6 * noise + 0.5 * np.sin(2 * np.pi * 185 * t)) * np.exp(-t / 0.06)
    return 0.5 * np.diff(noise, prepend=0.0) * np.exp(-t / 0.02)


def music(seconds: float, seed: int) -> np.ndarray:
    """float32 [samples, 2] at 44.1 kHz: synthetic music, different for each ``seed``: chords on an organ-like pad,
    a plucked melody, a bass line and drums, each instrument panned to its own place."""
    rng = np.random.default_rng(seed)
    out = np.zeros((int(seconds * SOURCE_RATE), 2))
    beat = 60.0 / rng.uniform(90, 140)
    root = 45 + int(rng.integers(0, 10))  # A2 .. F#3
    progression = _PROGRESSIONS[seed % len(_PROGRESSIONS)]
    hz = lambda midi: 440.0 * 2 ** ((midi - 69) / 12)  # noqa: E731
    pad = np.array([1.0, 0.5, 0.6, 0.2, 0.3, 0.1])
    pluck = 0.7 ** np.arange(10)
    bass = np.array([1.0, 0.6, 0.3, 0.1])
    major = [0, 4, 7, 12]

    def add(at: float, signal: np.ndarray, pan: float, gain: float) -> None:
        start = int(at * SOURCE_RATE)
        piece = signal[: max(0, len(out) - start)] * gain
        out[start:start + len(piece)] += piece[:, None] * [np.cos(pan * np.pi / 2), np.sin(pan * np.pi / 2)]

    for bar, at in enumerate(np.arange(0.0, seconds, 4 * beat)):
        chord = root + 12 + progression[bar % len(progression)]
        for step in major[:3]:
            add(at, _note(hz(chord + step), 4 * beat, pad, decay=3.0, attack=0.08), 0.3, 0.12)
        for b in range(4):
            add(at + b * beat, _note(hz(chord - 12 + (7 if b == 2 else 0)), beat, bass, decay=0.4), 0.5, 0.35)
            add(at + b * beat, _hit("kick" if b % 2 == 0 else "snare", rng), 0.5, 0.5)
            for half in (0.0, 0.5):
                add(at + (b + half) * beat, _hit("hat", rng), 0.75, 0.15)
            melody = chord + 12 + major[int(rng.integers(0, 4))] + (2 if rng.random() < 0.2 else 0)
            add(at + b * beat, _note(hz(melody), beat * 0.9, pluck, decay=0.25), 0.65, 0.2)
    return (0.9 * out / np.abs(out).max()).astype(np.float32)


def write_music_set(folder: Path, files: int, seconds: float) -> Path:
    """``files`` 16-bit stereo 44.1 kHz WAV files of ``seconds`` of synthetic music each, written once."""
    done = folder / ".complete"
    if not done.exists():
        folder.mkdir(parents=True, exist_ok=True)
        for index in range(files):
            sf.write(str(folder / f"song{index:02d}.wav"), music(seconds, seed=index), SOURCE_RATE, subtype="PCM_16")
        done.touch()
    return folder


def _extract(audio: Path, store: Path, model: str, env: dict[str, str]) -> tuple[dict[str, Any], float, float]:
    """`mess-ai extract --json` in a process of its own: (its summary, wall seconds, CPU seconds of the process)."""
    command = [sys.executable, "-m", "cli", "extract", str(audio), "--store", str(store), "--model", model,
               "--device", "cpu", "--hop-seconds", str(HOP_SECONDS), "--json"]
    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    proc = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=1800)
    wall = time.perf_counter() - started
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"mess-ai extract exited {proc.returncode}: {proc.stderr[-3000:]}")
    cpu = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
    return json.loads(proc.stdout), wall, cpu


def _import_seconds(env: dict[str, str]) -> dict[str, float]:
    """What importing costs a fresh process: the flow (Prefect and the pipeline), then torch and transformers'
    HubertModel (both imported by the model load)."""
    code = ("import json, sys, time; t = time.perf_counter(); import flows.extract; f = time.perf_counter(); "
            "early = 'torch' in sys.modules; import torch; g = time.perf_counter(); "
            "import transformers.models.hubert.modeling_hubert; h = time.perf_counter(); "
            "print(json.dumps({'flow': f - t, 'torch': g - f, 'hubert': h - g, 'torch_with_flow': early}))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=600, check=True)
    return json.loads(proc.stdout)


@contextlib.contextmanager
def _server(home: Path) -> Iterator[tuple[str, dict[str, str]]]:
    """A `prefect server start` on a free loopback port with the settings of `make server`, SQLite in ``home``:
    yields its API URL and an environment pointing at it as soon as it is started (``wait_healthy`` before use),
    so the inputs are made while it starts."""
    port = free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    home.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PREFECT_HOME=str(home), PREFECT_API_URL=api_url, **SERVER_SETTINGS)
    server = start([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)], env,
                   home / "server.log")
    try:
        yield api_url, env
    finally:
        stop(server)


def _flow_runs(api_url: str) -> int:
    request = urllib.request.Request(f"{api_url}/flow_runs/count", data=b"{}", method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return int(json.load(response))


def run(workdir: Path, quick: bool) -> dict[str, Any]:
    from mess_ai.features.extractor import default_batch_size
    from mess_ai.features.loading import get_model

    result = new_result(NAME, quick)
    size, files, seconds = ("tiny", QUICK_FILES, QUICK_FILE_SECONDS) if quick else ("base", FILES, FILE_SECONDS)
    folder = workdir / NAME
    with _server(folder / "prefect") as (api_url, server_env):
        audio = write_music_set(folder / "audio", files, seconds)
        model_path = checkpoint(workdir, size)
        # The bare loop's model (its load not timed). Loading it also leaves the weights' digest in the cache the
        # command reads, as any earlier run would.
        model = get_model(model_path, device="cpu")
        batch_size = default_batch_size(model.device)
        windows = premade_windows(audio, model.sampling_rate, HOP_SECONDS)
        bare_loop(model, windows[:batch_size], batch_size)  # first forward: oneDNN picks its kernels
        env = {**server_env, "PYTHONPATH": os.pathsep.join(
            [str(REPO_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
        wait_healthy(api_url)
        # Skipped by --quick, which must stay short: importing costs seconds.
        imports = {"flow": None, "torch": None, "hubert": None} if quick else _import_seconds(env)
        if not quick:  # the server's first flow run and the OS's file cache stay out of the figures
            warm_up = write_music_set(folder / "warm-up", 1, 6.0)
            _extract(warm_up, folder / "warm-up-store", checkpoint(workdir, "tiny"), env)
        runs_before = _flow_runs(api_url)

        batches = -(-len(windows) // batch_size)
        split = (batches // 2) * batch_size
        bare_seconds, bare_cpu = bare_loop(model, windows[:split], batch_size)
        summary, cli_wall, cli_cpu = _extract(audio, folder / "store", model_path, env)
        second_half = bare_loop(model, windows[split:], batch_size)
        bare_seconds, bare_cpu = bare_seconds + second_half[0], bare_cpu + second_half[1]
        runs_after_work = _flow_runs(api_url)

        noop, noop_wall, _ = _extract(audio, folder / "store", model_path, env)
        runs_after_noop = _flow_runs(api_url)

    if summary["done"] != files:
        raise RuntimeError(f"the command extracted {summary['done']} of {files} files: {summary['outcomes']}")
    if noop["unchanged"] != files:
        raise RuntimeError(f"the second command found {noop['unchanged']} of {files} files unchanged")
    audio_seconds = summary["audio_seconds"]
    model_in_cli = summary["stage_seconds"]["extract"]
    first_window, model_load = summary["first_window_seconds"], summary["model_load_seconds"]
    ratio = bare_seconds / cli_wall
    add_figure(result, "mess-ai extract throughput (whole command, wall clock)", audio_seconds / cli_wall,
               "audio s per s")
    add_figure(result, "bare model loop throughput (wall clock)", audio_seconds / bare_seconds, "audio s per s")
    add_figure(result, "command / bare, wall clock", ratio, "ratio")
    add_figure(result, "command / bare, CPU time (the command's process, the bench's for the loop)",
               bare_cpu / cli_cpu, "ratio")
    add_figure(result, "command wall clock", cli_wall, "s")
    add_figure(result, "fixed start: command wall clock outside the model call", cli_wall - model_in_cli, "s")
    add_figure(result, "imports in a fresh process: the flow (Prefect, pipeline)", imports["flow"], "s")
    if imports.get("torch_with_flow"):
        raise RuntimeError("importing the flow imported torch: the figures below would not say what they name")
    add_figure(result, "imports in a fresh process: torch (imported by the model load)", imports["torch"], "s")
    add_figure(result, "imports in a fresh process: transformers' HubertModel", imports["hubert"], "s")
    add_figure(result, "model load in the command (torch and transformers imports included)", model_load, "s")
    add_figure(result, "first window in the model, from the command's start", first_window, "s")
    add_figure(result, "first window minus model load", first_window - model_load, "s")
    add_figure(result, "no-op command wall clock", noop_wall, "s")
    add_figure(result, "flow runs started by the no-op command", runs_after_noop - runs_after_work, "runs")
    add_target(result, f"command throughput >= {TARGET_RATIO:.2f} x bare model loop", f"{ratio:.3f} x",
               ratio >= TARGET_RATIO,
               f"command {cli_wall:.1f} s, of which {model_in_cli:.1f} s in the model call; bare loop "
               f"{bare_seconds:.1f} s for the same batches")
    add_target(result, f"first window <= {TARGET_FIRST_WINDOW_SECONDS:g} s + model load after the command starts",
               f"{first_window:.2f} s = {model_load:.2f} s load + {first_window - model_load:.2f} s",
               first_window - model_load <= TARGET_FIRST_WINDOW_SECONDS,
               "imports in a fresh process: " + ("not measured (--quick)" if quick else
                                                 f"{imports['flow']:.2f} s for the flow, {imports['torch']:.2f} s "
                                                 f"for torch and {imports['hubert']:.2f} s for transformers' "
                                                 "HubertModel (both inside the model load)"))
    noop_ok = noop_wall <= TARGET_NOOP_SECONDS and not noop["model_loaded"] and runs_after_noop == runs_after_work
    add_target(result, f"nothing new: the command ends <= {TARGET_NOOP_SECONDS:g} s, no model, no flow run",
               f"{noop_wall:.2f} s, model loaded: {noop['model_loaded']}, flow runs started: "
               f"{runs_after_noop - runs_after_work}", noop_ok)
    result["notes"] += [
        f"{files} files of {seconds:g} s of SYNTHETIC music-like audio (no real music can be downloaded here): "
        "chords on an organ-like pad, a plucked melody with decaying harmonics, a bass line, kick, snare and "
        "hi-hat, each panned; 44.1 kHz stereo 16-bit WAV, decoded, downmixed and resampled by the command.",
        f"Checkpoint: write_test_model(size={size!r}) (MERT-v1-95M's shape for 'base', RANDOM weights: the same "
        f"work as MERT). {len(windows)} windows of 5 s every {HOP_SECONDS:g} s (not the default 2.5 s: half the "
        f"model work, to fit a 2-core CPU), batch size {batch_size}, fp32 on the CPU, on both sides.",
        "The command: `python -m cli extract ... --json` in a process of its own against a `prefect server start` "
        "on a free loopback port (as `make server` starts it), timed from its start to its exit. The bare loop "
        "runs in the benchmark's process on the model it loaded (the load not timed), half its batches before the "
        "command and half after.",
        "Not timed: the server's start; a warm-up command over 6 s of audio with the tiny model (the server's "
        "first flow run, the OS's file cache; not in --quick). The weights' digest is cached (the benchmark "
        "loaded the checkpoint first), as after any earlier run; a first run ever hashes the checkpoint once.",
        "first_window_seconds and model_load_seconds come from the command's --json summary: seconds from the "
        "process's start to the first batch entering the model, and the run's time getting its model ready "
        "(the imports of torch and transformers included).",
        f"Flow runs counted on the server: {runs_after_work - runs_before} for the run with work, "
        f"{runs_after_noop - runs_after_work} for the run with nothing new.",
    ]
    result["details"] = {"audio_seconds": audio_seconds, "windows": len(windows), "batch_size": batch_size,
                         "hop_seconds": HOP_SECONDS, "cli_wall_seconds": cli_wall,
                         "cli_cpu_seconds": cli_cpu, "bare_seconds": bare_seconds, "bare_cpu_seconds": bare_cpu,
                         "cli_stage_seconds": summary["stage_seconds"], "imports": imports,
                         "noop_wall_seconds": noop_wall, "checkpoint_size": size}
    return result
