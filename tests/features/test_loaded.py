"""Tests of mess_ai.features.loaded: what a loaded model expects of its input and its one forward path, which runs a
HubertModel's front end one window at a time and gives the model's own hidden states."""

from __future__ import annotations

import copy
import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers import Wav2Vec2FeatureExtractor

from mess_ai.errors import ModelError
from mess_ai.features.loaded import LoadedModel, runs_front_end_per_window
from mess_ai.features.loading import load_model
from tests.helpers.audio import tone

SAMPLE_RATE = 24000


@pytest.fixture(scope="module")
def tiny(tiny_model: str) -> LoadedModel:
    return load_model(tiny_model, device="cpu")


def _windows(count: int) -> torch.Tensor:
    """float32 [count, 5 s]: a different noisy tone in each window."""
    return torch.from_numpy(np.stack([tone(5.0, SAMPLE_RATE, frequency=220.0 + 70 * i, seed=i)[:, 0]
                                      for i in range(count)]))


def test_tiny_model_gives_374_frames_for_five_seconds(tiny: LoadedModel) -> None:
    window = torch.from_numpy(tone(5.0, SAMPLE_RATE, seed=0)[:, 0]).unsqueeze(0)

    states = tiny.hidden_states(tiny.prepare(window))

    assert states.shape == (1, 3, 374, 32)
    assert states.dtype == torch.float32
    assert torch.isfinite(states).all()
    assert (tiny.sampling_rate, tiny.do_normalize, tiny.num_hidden_states, tiny.hidden_size) == (24000, False, 3, 32)


@pytest.mark.parametrize("do_normalize", [True, False])
def test_prepare_equals_wav2vec2_feature_extractor(tiny: LoadedModel, tiny_model: str, do_normalize: bool) -> None:
    windows = [tone(1.0, SAMPLE_RATE, frequency=f, amplitude=a, seed=s)[:, 0] + offset
               for f, a, s, offset in [(220.0, 0.9, 1, 0.0), (440.0, 0.1, 2, 0.3), (3000.0, 0.5, 3, -0.2)]]
    extractor = Wav2Vec2FeatureExtractor.from_pretrained(tiny_model, do_normalize=do_normalize)
    expected = extractor(windows, sampling_rate=SAMPLE_RATE, return_tensors="np")["input_values"]
    model = dataclasses.replace(tiny, do_normalize=do_normalize)

    prepared = model.prepare(torch.from_numpy(np.stack(windows)))

    assert prepared.dtype == torch.float32
    np.testing.assert_allclose(prepared.numpy(), expected, rtol=1e-5, atol=1e-5)


def test_prepare_wants_a_batch(tiny: LoadedModel) -> None:
    with pytest.raises(ValueError, match=r"\[batch, samples\]"):
        tiny.prepare(torch.zeros(24000))


def test_hidden_states_of_a_model_that_returns_none_raise(tiny: LoadedModel) -> None:
    class NoHiddenStates(torch.nn.Module):
        def forward(self, input_values: torch.Tensor, output_hidden_states: bool) -> SimpleNamespace:
            return SimpleNamespace(hidden_states=None)

    model = dataclasses.replace(tiny, model=NoHiddenStates())

    with pytest.raises(ModelError, match="no hidden states"):
        model.hidden_states(torch.zeros(1, 24000))


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16-autocast"])
def test_front_end_per_window_gives_the_models_own_hidden_states(tiny: LoadedModel, bf16: bool) -> None:
    inputs = tiny.prepare(_windows(3))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)
    with torch.inference_mode(), autocast:
        expected = torch.stack(tiny.model(inputs, output_hidden_states=True).hidden_states, dim=1)
        states = tiny.hidden_states(inputs)
    assert runs_front_end_per_window(tiny.model)
    assert states.shape == expected.shape == (3, 3, 374, 32)
    # Group norm normalises each window on its own, so the numbers are the same (equal bit for bit on the machine
    # this was written on); the tolerance only leaves a CPU's kernels room to sum in another order for batch 1.
    if bf16:
        torch.testing.assert_close(states, expected)  # bfloat16's own tolerance
    else:
        torch.testing.assert_close(states, expected, rtol=0, atol=1e-6)


def test_other_networks_are_not_taken_apart(tiny: LoadedModel) -> None:
    assert not runs_front_end_per_window(torch.nn.Identity())
    assert not runs_front_end_per_window(copy.deepcopy(tiny.model).train())  # SpecAugment and dropout act
