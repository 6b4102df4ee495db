"""Device choice: which torch device a run uses, and which devices its model workers run on (one per visible GPU).
``auto`` takes the best device present; a device asked for by name must be usable here, or the run is refused before
any model is loaded.

torch is imported only where a question needs it: on a Linux host without a GPU driver, ``auto`` and ``cpu`` are
answered without it (importing torch takes 1.5 s, which a run with nothing new, or one that has not reached its
model yet, need not pay)."""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

from mess_ai.errors import ModelError

if TYPE_CHECKING:
    import torch

# Tests and benchmarks only: this host has that many stand-in GPUs, each of them the CPU under its own name
# ('stand-in:0', ...), in place of its CUDA devices. They show, on machines without GPUs, how a run spreads its model
# work over several GPUs and how runs share a host's GPUs.
STAND_IN_GPUS_ENV = "MESS_AI_STAND_IN_GPUS"
STAND_IN = "stand-in"


def stand_in_gpus() -> int:
    """How many stand-in GPUs ``$MESS_AI_STAND_IN_GPUS`` asks for; 0 when it is unset."""
    value = os.environ.get(STAND_IN_GPUS_ENV, "").strip()
    if not value:
        return 0
    if not value.isdigit():
        raise ValueError(f"{STAND_IN_GPUS_ENV}={value!r}: expected a number of stand-in GPUs")
    return int(value)


# What a GPU driver puts on a Linux host (NVIDIA's, in containers too; AMD's ROCm; WSL's GPU bridge): without any
# of them torch can see no CUDA (or ROCm) device.
_GPU_DRIVER_PATHS = ("/dev/nvidiactl", "/proc/driver/nvidia", "/dev/kfd", "/dev/dxg")


def no_gpu_driver() -> bool:
    """Whether this host certainly has no GPU for torch: Linux without a GPU driver (elsewhere torch is asked)."""
    return sys.platform == "linux" and not any(os.path.exists(path) for path in _GPU_DRIVER_PATHS)


def visible_gpus() -> int:
    """The CUDA devices this process may use (``CUDA_VISIBLE_DEVICES`` applies), or the stand-ins."""
    stand_ins = stand_in_gpus()
    if stand_ins:
        return stand_ins
    if no_gpu_driver():
        return 0
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _cpu_for_certain(device: str) -> bool:
    """Whether ``resolve_device(device)`` is the CPU, known without importing torch: ``cpu``, or ``auto`` on a host
    with no GPU driver and no stand-in GPUs."""
    return device == "cpu" or (device == "auto" and not stand_in_gpus() and no_gpu_driver())


def device_type(device: str = "auto") -> str:
    """``resolve_device(device).type`` ('cuda', 'mps' or 'cpu'), without importing torch where the answer is the
    CPU for certain."""
    return "cpu" if _cpu_for_certain(device) else resolve_device(device).type


def resolve_device(device: str = "auto") -> torch.device:
    """The torch device to run on: ``auto`` picks cuda, then mps, then cpu; an explicit device must be usable.
    Stand-in GPUs are the CPU."""
    import torch

    if stand_in_gpus() and (device == "auto" or device.partition(":")[0] == "cuda"):
        model_devices(device, stand_in_gpus(), stand_in=True)  # the same checks as for a real GPU
        return torch.device("cpu")
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise ValueError(f"Unknown device {device!r}; use 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'.") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelError(f"Device {device!r} was asked for, but CUDA is not available to torch "
                             f"{torch.__version__}.")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ModelError(f"Device {device!r} was asked for, but only {torch.cuda.device_count()} CUDA device(s) "
                             f"are visible.")
    elif resolved.type == "mps":
        if not torch.backends.mps.is_available():
            raise ModelError(f"Device {device!r} was asked for, but MPS is not available to torch {torch.__version__}.")
    elif resolved.type != "cpu":
        raise ValueError(f"Unsupported device {device!r}; use 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'.")
    return resolved


def model_devices(device: str, gpus: int, stand_in: bool = False) -> list[str]:
    """The devices a run's model workers use, one worker each, for the ``device`` asked for on a host with ``gpus``
    visible GPUs (stand-ins with ``stand_in``): every GPU for ``cuda`` (and ``auto`` when there is one), only
    that one for ``cuda:K``, else the one device (``cpu``, ``mps``, or what ``auto`` finds)."""
    kind, colon, index = device.partition(":")
    if gpus and (device == "auto" or kind == "cuda"):
        name = STAND_IN if stand_in else "cuda"
        if not colon:
            return [f"{name}:{i}" for i in range(gpus)]
        if not index.isdigit():
            raise ValueError(f"Unknown device {device!r}; use 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'.")
        if int(index) >= gpus:
            raise ModelError(f"Device {device!r} was asked for, but only {gpus} CUDA device(s) are visible.")
        return [f"{name}:{int(index)}"]
    return ["cpu"] if _cpu_for_certain(device) else [str(resolve_device(device))]


def host_model_devices(device: str) -> list[str]:
    """``model_devices`` on this host: its visible GPUs, or the stand-ins of ``$MESS_AI_STAND_IN_GPUS``."""
    return model_devices(device, visible_gpus(), stand_in=bool(stand_in_gpus()))


def run_devices(device: str = "auto") -> list[str]:
    """The torch devices (by name: 'cuda:0', 'cpu') a run on this host computes on: every GPU its model workers
    use (``host_model_devices``), or its one device; stand-in GPUs are the CPU, listed once."""
    return list(dict.fromkeys(torch_device(name) for name in host_model_devices(device)))


def torch_device(name: str) -> str:
    """The torch device a model worker named ``name`` loads its model on (a stand-in GPU's is the CPU)."""
    return "cpu" if name.startswith(f"{STAND_IN}:") else name


def host_lock_name(name: str) -> str | None:
    """The name of the host-wide lock of the device a model worker named ``name`` uses; None for the CPU, which
    runs share as they always did. A CUDA device is named by its UUID: ``CUDA_VISIBLE_DEVICES`` numbers a host's
    GPUs differently in each process, and two runs that number one GPU differently must still take turns on it."""
    kind, _, index = name.partition(":")
    if kind == "cpu":
        return None
    if kind == "cuda":
        import torch

        uuid = getattr(torch.cuda.get_device_properties(int(index or 0)), "uuid", None)
        return f"cuda-{uuid}" if uuid else f"cuda-{index or 0}"
    return name.replace(":", "-")
