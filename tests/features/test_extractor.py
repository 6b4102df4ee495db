"""Tests of mess_ai.features.extractor: batches of windows through the model's one forward path give the numbers
of the model's own forward on all windows at once."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

import mess_ai.features.loaded as loaded_module
from mess_ai.features.extractor import Extractor
from mess_ai.features.loaded import LoadedModel, hubert_hidden_states
from mess_ai.features.loading import get_model
from tests.helpers.audio import tone

SAMPLE_RATE = 24000
WINDOW = 5 * SAMPLE_RATE


@pytest.fixture(scope="module")
def tiny(tiny_model: str) -> LoadedModel:
    return get_model(tiny_model, device="cpu")


def _windows(count: int, seed: int = 0) -> np.ndarray:
    """float32 [count, WINDOW]: a different noisy tone in each window."""
    return np.stack([tone(5.0, SAMPLE_RATE, frequency=220.0 + 70 * i, seed=seed + i)[:, 0] for i in range(count)])


def test_extractor_runs_the_per_window_front_end_in_batches(tiny: LoadedModel, monkeypatch: pytest.MonkeyPatch) -> None:
    batches = []

    def counting(net: torch.nn.Module, input_values: torch.Tensor) -> torch.Tensor:
        batches.append(input_values.shape[0])
        return hubert_hidden_states(net, input_values)

    monkeypatch.setattr(loaded_module, "hubert_hidden_states", counting)
    windows = _windows(5, seed=10)
    segments, raw = Extractor(tiny, WINDOW, batch_size=4).embed(windows)
    with torch.inference_mode():
        output = tiny.model(tiny.prepare(torch.from_numpy(windows)), output_hidden_states=True)
        expected = torch.stack(output.hidden_states, dim=1).mean(dim=2).numpy()
    assert batches == [4, 1]
    assert raw is None and segments.shape == (5, 3, 32)
    # batches of 4 and 1, front end one window at a time, against the model's own forward on one batch of 5
    np.testing.assert_allclose(segments, expected, rtol=0, atol=1e-6)


def test_a_model_with_its_own_hidden_states_is_asked_through_them(tiny: LoadedModel) -> None:
    @dataclasses.dataclass(frozen=True)
    class Counting(LoadedModel):
        calls: list = dataclasses.field(default_factory=list)

        def hidden_states(self, input_values: torch.Tensor) -> torch.Tensor:
            self.calls.append(input_values.shape[0])
            return super().hidden_states(input_values)

    counting = Counting(**{f.name: getattr(tiny, f.name) for f in dataclasses.fields(LoadedModel)})
    extractor = Extractor(counting, WINDOW, batch_size=2)
    extractor.embed(_windows(3))
    assert counting.calls == [2, 1]


def test_the_jobs_a_batch_completes_come_out_together_as_soon_as_it_runs(tiny: LoadedModel) -> None:
    from mess_ai.features.extractor import TrackJob

    windows = _windows(5, seed=3)
    one = lambda name, i: TrackJob(name, windows[i], [(0, WINDOW)])  # noqa: E731
    jobs = [one("a", 0), one("b", 1), TrackJob("c", np.concatenate(windows[2:4]), [(0, WINDOW), (WINDOW, WINDOW)]),
            one("d", 4)]
    seen = []  # what the model had run when each group came out

    extractor = Extractor(tiny, WINDOW, batch_size=2)
    for group in extractor.run_batches(iter(jobs)):
        seen.append(([job.track_id for job in group], extractor.stats.batches))
    # a and b share the first batch, c fills the second, d runs alone in a last, short one: each group is handed
    # over right after the batch that completed it, before the next batch runs
    assert seen == [(["a", "b"], 1), (["c"], 2), (["d"], 3)]
    assert all(job.complete and job.error is None for job in jobs)
    again = [dataclasses.replace(job, segments=None, windows_done=0) for job in jobs]
    assert [job.track_id for job in Extractor(tiny, WINDOW, batch_size=2).run(iter(again))] == ["a", "b", "c", "d"]
