"""Decoding in processes of our own (``mess_ai.audio.decode_worker``), so that decoding keeps up with a GPU.

Each worker process is owned by one thread of the pool, which starts it, hands it one file at a time, and replaces
it when it dies: a decoder that crashes or is killed for memory fails that file with the reason, never the run.
The owning thread is also the one whose end takes the worker along on Linux (``PR_SET_PDEATHSIG`` fires when the
thread that started a process ends), which is why a worker is never started from a passing thread of the run.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import mess_ai
from mess_ai.audio.decode_worker import (
    error_from,
    read_message,
    read_segment,
    sweep_segments,
    unlink_segment,
    write_message,
)
from mess_ai.audio.validation import AudioLimits
from mess_ai.errors import MessError

log = logging.getLogger(__name__)

# Decoding processes per GPU on a GPU host: one decodes CD audio at about 1,700x real time on a 2-core Xeon, and
# MERT-v1-95M in bf16 runs at 2,000-3,000x on an H100, so four keep one GPU fed with room for slower files and cores.
WORKERS_PER_GPU = 4
# How long an idle worker may take to exit once its stdin is closed, before it is killed.
_EXIT_SECONDS = 2.0


def default_decode_workers(device_type: str, gpus: int, cpus: int) -> int:
    """Decoding processes for a run on ``gpus`` GPUs of ``device_type`` with ``cpus`` usable cores.

    On a GPU (cuda, mps): ``WORKERS_PER_GPU`` per GPU, capped by the cores less one (the run's own thread, which
    hashes files and feeds the GPU, keeps a core). On a CPU: none. There the model runs at a few times real time
    on all the cores, hundreds of times slower than decoding: the run's decode-ahead thread keeps it fed, and
    every core is the model's.
    """
    if device_type == "cpu":
        return 0
    return max(0, min(WORKERS_PER_GPU * gpus, cpus - 1))


def usable_cpus() -> int:
    """Cores this process may run on (its affinity, which containers and taskset narrow), else the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class DecodingProcessDied(MessError):
    """The decoding process died while decoding a file (a crash in a decoder, killed for memory): worth another
    try, and given up on after a few deaths on the same bytes (see ``mess_ai.extraction.track``). Its message is
    the reason alone, as recorded against the file."""

    def __init__(self, path: str | Path, how: str) -> None:
        self.path = str(path)
        super().__init__(f"the decoding process died ({how}) while decoding it")


@dataclass(frozen=True)
class Decoded:
    """What a worker decoded: ``samples`` float32 [n_samples], and the ``seconds`` the worker spent on it."""

    samples: np.ndarray
    seconds: float


class NotTheSameFile(Exception):
    """The worker did not decode the file: it is not (or no longer) the file the parent opened and hashed."""

    def __init__(self, why: str) -> None:
        self.why = why
        super().__init__(why)


class DecodePoolClosed(MessError):
    """The pool was closed (the run is ending) before the file was decoded."""


def _how(returncode: int) -> str:
    if returncode < 0:
        return f"killed by signal {-returncode}" + (f", {signal.Signals(-returncode).name}"
                                                    if -returncode in signal.valid_signals() else "")
    return f"exit code {returncode}"


class DecodePool:
    """``workers`` decoding processes; ``decode`` hands one file to the first free one and returns a future.

    A future's result is the samples, float32 [n_samples] (mapped from the worker's shared memory, no copy); its
    exception is what ``load_mono`` raised in the worker (the same class, file and reason), ``NotTheSameFile``,
    ``DecodingProcessDied``, or ``DecodePoolClosed``. ``close`` ends every worker and fails what is still queued.
    """

    def __init__(self, workers: int) -> None:
        if workers < 1:
            raise ValueError(f"a decode pool needs at least one worker, got {workers}")
        self.workers = workers
        for name in sweep_segments():
            log.info("Removed shared memory left by a run that died: %s.", name)
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._closed = threading.Event()
        self._processes: dict[int, subprocess.Popen] = {}
        self._busy: set[int] = set()  # the slots whose worker is decoding a file
        self._guard = threading.Lock()
        self._threads = [threading.Thread(target=self._serve, args=(slot,), name=f"mess-ai-decoder-{slot}",
                                          daemon=True) for slot in range(workers)]
        for thread in self._threads:
            thread.start()

    def decode(self, path: str | Path, expected_identity: tuple[int, ...], sampling_rate: int,
               limits: AudioLimits) -> Future:
        """Decode ``path`` as ``load_mono(path, sampling_rate, limits=limits)`` would, provided it is still the file
        whose ``identity`` is ``expected_identity``."""
        future: Future = Future()
        if self._closed.is_set():
            future.set_exception(DecodePoolClosed(f"{path}: the decoding processes were stopped"))
        else:
            self._queue.put(([str(path), list(expected_identity), sampling_rate, dataclasses.asdict(limits)],
                             future))
        return future

    def pids(self) -> list[int]:
        """The process ids of the live workers."""
        with self._guard:
            return [process.pid for process in self._processes.values() if process.poll() is None]

    def close(self) -> None:
        """End the workers: an idle one exits as its stdin closes, a busy one is killed (nobody waits for its file
        any more, and it may be stuck); files still queued fail with ``DecodePoolClosed``. Returns once every
        worker has exited."""
        if self._closed.is_set():
            return
        self._closed.set()
        for _ in self._threads:
            self._queue.put(None)
        with self._guard:
            busy = [self._processes[slot] for slot in self._busy if slot in self._processes]
        for process in busy:
            process.kill()
        for thread in self._threads:
            thread.join()
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                self._fail(item, DecodePoolClosed(f"{item[0][0]}: the decoding processes were stopped"))

    def __enter__(self) -> "DecodePool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- the thread that owns one worker ----------------------------------------------------------------
    def _serve(self, slot: int) -> None:
        # Started at once: its imports (a fraction of a second) overlap the run's hashing of the first files.
        process = self._start_or_none(slot)
        try:
            while (item := self._queue.get()) is not None:
                request, future = item
                if self._closed.is_set():
                    self._fail(item, DecodePoolClosed(f"{request[0]}: the decoding processes were stopped"))
                    break
                if not future.set_running_or_notify_cancel():
                    continue
                if process is None:
                    try:
                        process = self._start(slot)
                    except OSError as exc:
                        future.set_exception(OSError(exc.errno, f"cannot start a decoding process: {exc}"))
                        continue
                with self._guard:  # ``close`` kills the workers it finds busy: none may become busy after it
                    if self._closed.is_set():
                        future.set_exception(DecodePoolClosed(f"{request[0]}: the decoding processes were stopped"))
                        break
                    self._busy.add(slot)
                reply = self._ask(process, request)
                with self._guard:
                    self._busy.discard(slot)
                if reply is not None:
                    self._deliver(reply, future)
                    continue
                returncode = process.wait()
                with self._guard:
                    self._processes.pop(slot, None)
                process = None
                if self._closed.is_set():
                    future.set_exception(DecodePoolClosed(f"{request[0]}: the decoding processes were stopped"))
                    break
                error = DecodingProcessDied(request[0], _how(returncode))
                log.warning("%s: %s; starting another decoding process.", request[0], error)
                future.set_exception(error)
                process = self._start_or_none(slot)
        finally:
            if process is not None:
                self._stop(slot, process)

    def _start_or_none(self, slot: int) -> subprocess.Popen | None:
        """A worker for ``slot``, or None when one cannot be started now (tried again, and reported, with the next
        file)."""
        try:
            return self._start(slot)
        except OSError:
            return None

    def _start(self, slot: int) -> subprocess.Popen:
        # The worker imports the same mess_ai as this process, wherever that was found (an editable install, a
        # flow's code folder put on sys.path by the worker that runs it).
        environment = dict(os.environ)
        package_root = str(Path(mess_ai.__file__).resolve().parent.parent)
        environment["PYTHONPATH"] = os.pathsep.join(filter(None, (package_root, environment.get("PYTHONPATH"))))
        process = subprocess.Popen([sys.executable, "-m", "mess_ai.audio.decode_worker", str(os.getpid())],
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=environment)
        with self._guard:
            self._processes[slot] = process
        return process

    @staticmethod
    def _ask(process: subprocess.Popen, request: list) -> list | None:
        """The worker's reply to ``request``, or None when it died (before or while answering)."""
        try:
            write_message(process.stdin, request)
            return read_message(process.stdout)
        except (OSError, EOFError, ValueError):  # a broken pipe, or a stream closed by ``close``
            return None

    def _deliver(self, reply: list, future: Future) -> None:
        kind = reply[0]
        if kind == "decoded":
            _, name, n_samples, seconds = reply
            if self._closed.is_set():
                unlink_segment(name)
                future.set_exception(DecodePoolClosed("the decoding processes were stopped"))
                return
            samples = read_segment(name, n_samples)
            future.set_result(Decoded(samples, seconds))
        elif kind == "changed":
            future.set_exception(NotTheSameFile(reply[1]))
        else:
            future.set_exception(error_from(reply[1]))

    def _stop(self, slot: int, process: subprocess.Popen) -> None:
        """Close the worker's stdin (it exits), and kill it if it has not within ``_EXIT_SECONDS``."""
        try:
            process.stdin.close()
        except OSError:
            pass
        try:
            process.wait(_EXIT_SECONDS)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        process.stdout.close()
        with self._guard:
            self._processes.pop(slot, None)

    @staticmethod
    def _fail(item: tuple, error: BaseException) -> None:
        future = item[1]
        if future.set_running_or_notify_cancel():
            future.set_exception(error)
