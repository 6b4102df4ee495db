"""Tests of mess_ai.features.extractor: the front end one window at a time gives the model's own hidden states."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

import mess_ai.features.extractor as extractor_module
from mess_ai.features.extractor import Extractor, hubert_hidden_states, runs_front_end_per_window
from mess_ai.features.model import LoadedModel, get_model
from tests.helpers.audio import tone

SAMPLE_RATE = 24000
WINDOW = 5 * SAMPLE_RATE


@pytest.fixture(scope="module")
def tiny(tiny_model: str) -> LoadedModel:
    return get_model(tiny_model, device="cpu")


def _windows(count: int, seed: int = 0) -> np.ndarray:
    """float32 [count, WINDOW]: a different noisy tone in each window."""
    return np.stack([tone(5.0, SAMPLE_RATE, frequency=220.0 + 70 * i, seed=seed + i)[:, 0] for i in range(count)])


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16-autocast"])
def test_front_end_per_window_gives_the_models_own_hidden_states(tiny: LoadedModel, bf16: bool) -> None:
    inputs = tiny.prepare(torch.from_numpy(_windows(3)))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)
    with torch.inference_mode(), autocast:
        expected = tiny.hidden_states(inputs)
        states = hubert_hidden_states(tiny.model, inputs)
    assert states.shape == expected.shape == (3, 3, 374, 32)
    # Group norm normalises each window on its own, so the numbers are the same (equal bit for bit on the machine
    # this was written on); the tolerance only leaves a CPU's kernels room to sum in another order for batch 1.
    if bf16:
        torch.testing.assert_close(states, expected)  # bfloat16's own tolerance
    else:
        torch.testing.assert_close(states, expected, rtol=0, atol=1e-6)


def test_extractor_uses_the_per_window_front_end_for_a_plain_loaded_hubert(tiny: LoadedModel,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    batches = []

    def counting(net: torch.nn.Module, input_values: torch.Tensor) -> torch.Tensor:
        batches.append(input_values.shape[0])
        return hubert_hidden_states(net, input_values)

    monkeypatch.setattr(extractor_module, "hubert_hidden_states", counting)
    assert runs_front_end_per_window(tiny)
    windows = _windows(5, seed=10)
    segments, raw = Extractor(tiny, WINDOW, batch_size=4).embed(windows)
    with torch.inference_mode():
        expected = tiny.hidden_states(tiny.prepare(torch.from_numpy(windows))).mean(dim=2).numpy()
    assert batches == [4, 1]
    assert raw is None and segments.shape == (5, 3, 32)
    np.testing.assert_allclose(segments, expected, rtol=0, atol=1e-6)  # batches of 4 and 1 against one of 5


def test_a_model_with_its_own_hidden_states_is_asked_through_them(tiny: LoadedModel) -> None:
    @dataclasses.dataclass(frozen=True)
    class Counting(LoadedModel):
        calls: list = dataclasses.field(default_factory=list)

        def hidden_states(self, input_values: torch.Tensor) -> torch.Tensor:
            self.calls.append(input_values.shape[0])
            return super().hidden_states(input_values)

    counting = Counting(**{f.name: getattr(tiny, f.name) for f in dataclasses.fields(LoadedModel)})
    assert not runs_front_end_per_window(counting)
    extractor = Extractor(counting, WINDOW, batch_size=2)
    extractor.embed(_windows(3))
    assert counting.calls == [2, 1]


def test_other_networks_are_not_taken_apart(tiny: LoadedModel) -> None:
    assert not runs_front_end_per_window(dataclasses.replace(tiny, model=torch.nn.Identity()))
