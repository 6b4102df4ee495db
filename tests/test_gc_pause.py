"""mess_ai.gc_pause: no cyclic collection inside the block, the collector as it was after it."""

from __future__ import annotations

import gc
import threading

from mess_ai.gc_pause import gc_paused


def test_no_collection_inside_and_the_collector_back_after():
    collections = []

    def count(phase, info):
        if phase == "start":
            collections.append(info["generation"])

    gc.callbacks.append(count)
    try:
        assert gc.isenabled()
        with gc_paused():
            assert not gc.isenabled()
            # Containers that live on, far past every threshold: collections would start without the pause.
            kept = [[] for _ in range(200_000)]
            inside = len(collections)
        assert gc.isenabled()
        kept += [[] for _ in range(200_000)]
    finally:
        gc.callbacks.remove(count)
    assert inside == 0 and len(collections) > 0


def test_nested_and_concurrent_blocks_keep_it_paused_until_the_last_ends():
    entered, leave = threading.Event(), threading.Event()

    def other():
        with gc_paused():
            entered.set()
            leave.wait(10)

    thread = threading.Thread(target=other)
    thread.start()
    entered.wait(10)
    with gc_paused():
        with gc_paused():
            pass
        assert not gc.isenabled()
    assert not gc.isenabled()  # the other thread's block still runs
    leave.set()
    thread.join()
    assert gc.isenabled()


def test_a_disabled_collector_stays_disabled():
    gc.disable()
    try:
        with gc_paused():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()
