"""Tests of mess_ai.features.device and device_locks: ``auto`` takes the best device present, an unusable one is
refused; one model worker per visible GPU; a device is held by one model work at a time on a host."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from mess_ai.errors import ModelError
from mess_ai.features.device import (
    STAND_IN_GPUS_ENV,
    host_lock_name,
    host_model_devices,
    model_devices,
    resolve_device,
    torch_device,
)
from mess_ai.features.device_locks import hold_device


def test_resolve_device() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    with pytest.raises(ValueError, match="tpu9"):
        resolve_device("tpu9")
    if not torch.cuda.is_available():
        with pytest.raises(ModelError, match="CUDA is not available"):
            resolve_device("cuda:1")


def test_one_model_worker_per_visible_gpu_or_the_one_device_asked_for() -> None:
    assert model_devices("cuda", 4) == ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]
    assert model_devices("auto", 2) == ["cuda:0", "cuda:1"]
    assert model_devices("cuda:2", 4) == ["cuda:2"]
    assert model_devices("cpu", 4) == ["cpu"]
    assert model_devices("cuda", 2, stand_in=True) == ["stand-in:0", "stand-in:1"]
    assert model_devices("auto", 0) == [str(resolve_device("auto"))]
    with pytest.raises(ModelError, match="'cuda:4' was asked for, but only 4 CUDA device"):
        model_devices("cuda:4", 4)
    with pytest.raises(ValueError, match="cuda:x"):
        model_devices("cuda:x", 2)


def test_stand_in_gpus_are_the_cpu_under_names_of_their_own(monkeypatch) -> None:
    monkeypatch.setenv(STAND_IN_GPUS_ENV, "2")
    assert host_model_devices("cuda") == host_model_devices("auto") == ["stand-in:0", "stand-in:1"]
    assert host_model_devices("cuda:1") == ["stand-in:1"]
    assert host_model_devices("cpu") == ["cpu"]
    assert resolve_device("cuda:1") == resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ModelError, match="only 2 CUDA device"):
        resolve_device("cuda:2")
    assert torch_device("stand-in:1") == "cpu"
    assert [host_lock_name(name) for name in ("stand-in:1", "cpu", "mps")] == ["stand-in-1", None, "mps"]
    monkeypatch.setenv(STAND_IN_GPUS_ENV, "two")
    with pytest.raises(ValueError, match=STAND_IN_GPUS_ENV):
        host_model_devices("cuda")


# --- host-wide device locks -----------------------------------------------------------------------------------

STAND_INS = {"stand-in:0": "stand-in-0", "stand-in:1": "stand-in-1"}


def test_a_device_another_process_holds_is_left_to_it_until_that_process_dies(lock_dir) -> None:
    lock_dir.mkdir(parents=True)
    holder = subprocess.Popen(  # another run on this host, holding stand-in:0
        [sys.executable, "-c", "import fcntl, os, sys, time\n"
         f"fd = os.open({str(lock_dir / 'stand-in-0.lock')!r}, os.O_RDWR | os.O_CREAT)\n"
         "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with hold_device(STAND_INS) as device:
            assert device == "stand-in:1"
        got = []
        waiter = threading.Thread(target=lambda: got.append(_hold_briefly({"stand-in:0": "stand-in-0"})))
        waiter.start()
        waiter.join(0.5)
        assert not got  # waits while the other process holds it
    finally:
        holder.kill()  # a killed run: the kernel drops its lock
        holder.wait()
    waiter.join(5)
    assert got == ["stand-in:0"]


def test_within_a_process_model_work_waits_for_a_free_device_and_gets_it_at_once(lock_dir) -> None:
    spans: dict[str, tuple[str, float, float]] = {}
    first_inside = threading.Event()

    def work(name: str, devices: dict) -> None:
        if name != "first":
            first_inside.wait(5)
        with hold_device(devices) as device:
            entered = time.monotonic()
            first_inside.set()
            time.sleep(0.3 if name == "first" else 0.0)
            spans[name] = (device, entered, time.monotonic())

    cpu = {"cpu": None}  # no host-wide lock: only this process's runs take turns on it
    threads = [threading.Thread(target=work, args=("first", cpu)), threading.Thread(target=work, args=("cpu", cpu)),
               threading.Thread(target=work, args=("other", {"stand-in:0": "stand-in-0"}))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert spans["cpu"][1] >= spans["first"][2]  # the same device: after the first ...
    assert spans["cpu"][1] - spans["first"][2] < 0.1  # ... at once (no polling within a process)
    assert spans["other"][1] < spans["first"][2]  # another device: meanwhile
    assert not list(lock_dir.glob("cpu*"))


def _hold_briefly(devices: dict) -> str:
    with hold_device(devices) as device:
        return device


# --- torch only where needed ------------------------------------------------------------------------------------

def test_device_type_is_resolve_devices_type(monkeypatch) -> None:
    from mess_ai.features.device import device_type

    monkeypatch.delenv(STAND_IN_GPUS_ENV, raising=False)
    for device in ("auto", "cpu"):
        assert device_type(device) == resolve_device(device).type
    monkeypatch.setenv(STAND_IN_GPUS_ENV, "2")
    assert device_type("auto") == device_type("cuda:1") == "cpu"


_NO_TORCH_RUN = """
import sys
from mess_ai.config import ExtractConfig
from mess_ai.pipeline import run_extraction
import flows.extract, flows.analyze, tasks.extraction, deployments.watch, cli.main

def refuse(*args, **kwargs):
    raise AssertionError("the model was loaded")

summary = run_extraction(sys.argv[1], sys.argv[2], config=ExtractConfig(model=sys.argv[3]), model_loader=refuse)
assert summary.counts.unchanged == 2 and not summary.model_loaded, summary.to_dict()
print("torch imported:", "torch" in sys.modules, "transformers imported:", "transformers" in sys.modules)
"""


@pytest.mark.skipif(not __import__("mess_ai.features.device", fromlist=["no_gpu_driver"]).no_gpu_driver(),
                    reason="this host has a GPU driver: torch is asked which devices there are")
def test_a_run_with_nothing_new_and_the_flow_modules_never_import_torch(tmp_path, tiny_model) -> None:
    """On a host without a GPU, deciding the device (``auto``), planning and finding nothing new need no torch:
    its import (1.5 s) is paid by the model's load only."""
    from mess_ai.config import ExtractConfig
    from mess_ai.pipeline import run_extraction
    from tests.helpers.audio import write_audio

    audio, store = tmp_path / "audio", tmp_path / "store"
    for i in range(2):
        write_audio(audio / f"a{i}.wav", seconds=1.0, seed=i)
    assert run_extraction(audio, store, config=ExtractConfig(model=tiny_model)).done == 2
    out = subprocess.run([sys.executable, "-c", _NO_TORCH_RUN, str(audio), str(store), tiny_model],
                         capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parents[2])
    assert out.returncode == 0, out.stderr
    assert "torch imported: False transformers imported: False" in out.stdout
