"""Progress events within one process: the pipeline announces, whoever listens (a CLI progress bar) hears.

The flows run the pipeline in task threads of the same process, so a listener registered around a flow call
hears the files finish without anything passing through Prefect.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Callable, Iterator

Listener = Callable[[str, dict[str, Any]], None]

_listeners: list[Listener] = []
_lock = threading.Lock()


@contextlib.contextmanager
def listening(listener: Listener) -> Iterator[None]:
    with _lock:
        _listeners.append(listener)
    try:
        yield
    finally:
        with _lock:
            _listeners.remove(listener)


def emit(event: str, info: dict[str, Any]) -> None:
    """Tell every listener; a listener's error never disturbs the pipeline."""
    with _lock:
        listeners = list(_listeners)
    for listener in listeners:
        try:
            listener(event, info)
        except Exception:  # noqa: BLE001 - progress display is never worth failing a run
            pass
