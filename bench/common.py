"""What the benchmarks share: the machine, the Prefect API, audio and checkpoints, the flow's model hook, results.

Results are plain dicts: ``figures`` (label, value, unit), ``targets`` (target, measured, met, why) and ``notes``,
plus whatever a benchmark keeps under ``details``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import psutil

from tests.helpers.audio import write_tone_in_blocks

RESULTS_DIR = Path(__file__).parent / "results"
DOCS_PATH = Path(__file__).parent.parent / "docs" / "benchmarks.md"

# CD audio: the pipeline has to decode, downmix and resample it to MERT's 24 kHz.
SOURCE_RATE = 44100
SOURCE_CHANNELS = 2


def prepare_environment() -> None:
    """Environment for a benchmark process, set before anything imports Prefect or huggingface_hub.

    Prefect gets a temporary home and its ephemeral API (an API the shell may point at is ignored: a benchmark
    must not depend on, or write into, someone's server); the hub is never contacted.
    """
    os.environ.pop("PREFECT_API_URL", None)
    os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="mess-ai-bench-prefect-")
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "120"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def machine() -> dict[str, Any]:
    import torch

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": cpu,
        "logical_cores": psutil.cpu_count(logical=True),
        "physical_cores": psutil.cpu_count(logical=False),
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "os": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def new_result(name: str, quick: bool) -> dict[str, Any]:
    """An empty result; the load average says whether something else was running on the machine meanwhile."""
    return {"benchmark": name, "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "quick": quick, "machine": machine(), "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
            "figures": [], "targets": [], "notes": [], "details": {}}


def add_figure(result: dict[str, Any], label: str, value: float | None, unit: str) -> None:
    result["figures"].append({"label": label, "value": value, "unit": unit})


def add_target(result: dict[str, Any], target: str, measured: str, met: bool | None, why: str = "") -> None:
    """``met`` is None when the target could not be measured here (``why`` says why)."""
    result["targets"].append({"target": target, "measured": measured, "met": met, "why": why})


# --- Prefect --------------------------------------------------------------------------------------------------
_prefect_started: float | None = None


def start_prefect() -> float:
    """Start the ephemeral Prefect API by running a trivial flow, once per process; returns the seconds it took.

    Every timed flow run comes after this, so no benchmark figure includes the API's start-up.
    """
    global _prefect_started
    if _prefect_started is None:
        from prefect import flow

        @flow(name="bench-start-api")
        def start_api() -> None:
            return None

        started = time.perf_counter()
        start_api()
        _prefect_started = time.perf_counter() - started
    return _prefect_started


@contextlib.contextmanager
def flow_model_loader(loader: Callable[..., Any]) -> Iterator[None]:
    """Make the ``extract-features`` flow load its model with ``loader``.

    The flow builds ``ExtractionSession(...)`` without a ``model_loader``, so the session takes its keyword
    default, bound to ``get_model`` when ``mess_ai.pipeline`` was imported; patching the module attribute would
    not reach it. The default itself is swapped here, and put back afterwards.
    """
    from mess_ai.pipeline import ExtractionSession

    defaults = ExtractionSession.__init__.__kwdefaults__
    previous = defaults["model_loader"]
    defaults["model_loader"] = loader
    try:
        yield
    finally:
        defaults["model_loader"] = previous


def run_flow(audio_dir: Path, store: Path, model: str, **parameters: Any) -> dict[str, Any]:
    """The ``extract-features`` flow (on the CPU unless ``parameters`` say otherwise), with its own defaults."""
    from flows.extract import extract_features

    from bench.probe import OVERHEAD_PROBE, PROBE_REVISION

    from mess_ai.config import split_settings

    parameters.setdefault("device", "cpu")
    if model == OVERHEAD_PROBE:
        parameters.setdefault("revision", PROBE_REVISION)
    config, run, rest = split_settings(model=model, **parameters)
    return extract_features(audio_dir=str(audio_dir), store=str(store), config=config, run=run, **rest)


_flow_warmed = False


def warm_up_flow(workdir: Path) -> None:
    """One untimed run of the flow over a 3-second file with the overhead probe, once per process: first-run
    costs (imports, the GPU concurrency limit's creation, Prefect's task machinery) stay out of the figures."""
    global _flow_warmed
    if _flow_warmed:
        return
    from bench.probe import OVERHEAD_PROBE, overhead_probe

    start_prefect()
    folder = workdir / "warm-up"
    write_tone_in_blocks(folder / "audio" / "warm-up.wav", 3.0, SOURCE_RATE, SOURCE_CHANNELS)
    with flow_model_loader(overhead_probe):
        run_flow(folder / "audio", folder / "store", OVERHEAD_PROBE)
    _flow_warmed = True


# --- inputs ---------------------------------------------------------------------------------------------------
def audio_set(workdir: Path, files: int, seconds: float, sample_rate: int = SOURCE_RATE,
              channels: int = SOURCE_CHANNELS) -> Path:
    """A folder of ``files`` 16-bit WAV files of ``seconds`` each (a different tone per file), written once per
    workdir and shared by the benchmarks that ask for the same set. Nothing may write into it."""
    folder = workdir / "audio" / f"{files}x{seconds:g}s-{sample_rate}Hz-{channels}ch"
    done = folder / ".complete"
    if not done.exists():
        for index in range(files):
            write_tone_in_blocks(folder / f"track{index:04d}.wav", seconds, sample_rate, channels,
                                 frequency=110.0 + 7.0 * index)
        done.touch()
    return folder


def checkpoint(workdir: Path, size: str) -> str:
    """A MERT-format checkpoint with RANDOM weights (``base``: MERT-v1-95M's shape), written once per workdir."""
    from mess_ai.features.checkpoint import SAFETENSORS_FILE
    from mess_ai.features.random_checkpoints import write_test_model

    directory = workdir / "checkpoints" / size
    if not (directory / SAFETENSORS_FILE).exists():  # written last
        write_test_model(directory, size=size)
    return str(directory)


def folder_bytes(folder: Path, pattern: str = "*") -> int:
    """Apparent size of the files under ``folder`` matching ``pattern``."""
    return sum(p.stat().st_size for p in folder.rglob(pattern) if p.is_file())


def rss_mb() -> float:
    return psutil.Process().memory_info().rss / 2**20
