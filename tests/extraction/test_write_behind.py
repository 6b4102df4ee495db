"""The tracks a batch finishes are written behind the model, by a thread of their own: the model's next batches run
meanwhile, at most a bounded number of groups wait, and a write that cannot be recorded stops the work."""

from __future__ import annotations

import dataclasses
import threading
import time

import numpy as np
import pytest

from mess_ai.config import ExtractConfig
from mess_ai.deadline import Activity
from mess_ai.errors import StoreError
from mess_ai.extraction.model_stage import WriteBehind
from mess_ai.extraction.stats import FileOutcome
from mess_ai.features.extractor import TrackJob
from mess_ai.features.loaded import LoadedModel
from mess_ai.features.loading import get_model
from mess_ai.pipeline import run_extraction
from mess_ai.store import FeatureStore
from tests.helpers.audio import write_audio


def job(name: str) -> TrackJob:
    return TrackJob(name, np.ones(8, np.float32), [(0, 8)], windows_done=1)


def outcome(j: TrackJob) -> FileOutcome:
    return FileOutcome(j.track_id, j.track_id, "done")


def test_groups_are_written_in_order_while_the_caller_goes_on():
    written, started = [], time.perf_counter()

    def finish(group):
        time.sleep(0.2)
        written.append([j.track_id for j in group])
        return [outcome(j) for j in group]

    with WriteBehind(finish, Activity()) as behind:
        first = [job("a"), job("b")]
        behind.put(first)
        behind.put([job("c")])
        handed_over = time.perf_counter() - started
        assert first[0].signal.size == 0  # the audio of a track handed over is let go
    assert handed_over < 0.15  # neither put waited for a write (each takes 0.2 s)
    assert written == [["a", "b"], ["c"]]
    assert [o.track_id for o in behind.outcomes] == ["a", "b", "c"]


def test_at_most_depth_groups_wait_and_a_waiting_caller_says_what_the_writer_does():
    activity, release = Activity(), threading.Event()

    def finish(group):
        activity.set(f"writing the features of {group[0].track_id}", group[0].track_id, "write")
        release.wait(30)
        return [outcome(j) for j in group]

    returned, seen = [], {}
    with WriteBehind(finish, activity, depth=2) as behind:
        def caller():
            for name in "abcd":  # a is being written, b and c wait: d must wait for room
                behind.put([job(name)])
                returned.append(name)

        thread = threading.Thread(target=caller)
        thread.start()
        time.sleep(1.5)
        seen["returned"] = list(returned)
        seen["doing"] = activity.of(thread.ident)
        release.set()
        thread.join(30)
    assert seen["returned"] == ["a", "b", "c"]
    assert seen["doing"] == ("waiting for the writes behind the model (writing the features of a)", "a", "write")
    assert returned == list("abcd") and len(behind.outcomes) == 4


def test_a_write_that_cannot_be_recorded_stops_the_work_and_later_groups_are_left_unwritten():
    calls = []

    def finish(group):
        calls.append(group[0].track_id)
        raise StoreError("cannot write the manifest: disk full")

    with pytest.raises(StoreError, match="disk full"):
        with WriteBehind(finish, Activity(), depth=8) as behind:
            behind.put([job("a")])
            time.sleep(0.3)
            behind.put([job("b")])  # raises the writer's error
            behind.put([job("c")])
    assert calls == ["a"]


@dataclasses.dataclass(frozen=True)
class TimedModel(LoadedModel):
    """The tiny model, each batch also taking 50 ms of 'device' time (a sleep, as a GPU's work leaves the CPU
    free), with the interval of each batch recorded."""

    spans: list = dataclasses.field(default_factory=list)

    def hidden_states(self, input_values):
        started = time.perf_counter()
        time.sleep(0.05)
        out = super().hidden_states(input_values)
        self.spans.append((started, time.perf_counter()))
        return out


def test_tracks_are_written_while_the_model_runs_its_next_batches(tmp_path, tiny_model, monkeypatch):
    for i in range(8):  # one 5 s window each: one track per batch of one
        write_audio(tmp_path / "audio" / f"clip{i}.wav", seconds=5.0, sample_rate=24000, frequency=300 + 40 * i)
    tiny = get_model(tiny_model, device="cpu")
    model = TimedModel(**{f.name: getattr(tiny, f.name) for f in dataclasses.fields(LoadedModel)})
    writes = []
    real = FeatureStore.write_segments

    def slow_write(self, *args, **kwargs):
        started = time.perf_counter()
        time.sleep(0.05)  # a slow disk: as long as a batch
        real(self, *args, **kwargs)
        writes.append((started, time.perf_counter()))

    monkeypatch.setattr(FeatureStore, "write_segments", slow_write)
    summary = run_extraction(tmp_path / "audio", tmp_path / "store", model_loader=lambda *a, **k: model,
                             config=ExtractConfig(model=tiny_model, device="cpu", batch_size=1), decode_workers=0)
    assert summary.done == 8 and len(writes) == 8 and len(model.spans) == 8
    overlapping = [w for w in writes if any(s < w[1] and w[0] < e for s, e in model.spans)]
    assert len(overlapping) >= 4  # written on the model's thread, no write could overlap a batch
