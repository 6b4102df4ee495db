"""The overhead probe: a zero-cost stand-in for MERT that returns correctly shaped zeros.

It is a ``LoadedModel`` (so the pipeline's own ``prepare``, batching, pooling and writes all run unchanged) whose
``hidden_states`` skips the network: it answers float32 [batch, 13, frames, 768] zeros, ``frames`` from MERT's
convolution front end. The zeros are a broadcast view of one [768] row, so the probe allocates nothing, and the
pipeline's pooling over frames stays a vectorised pass over one cached row (about 1 s per audio hour on the
benchmark machine; a materialised [B, 13, 374, 768] block would cost ~17 s per audio hour of memory traffic that a
GPU run spends on the GPU, not on the CPU this benchmark measures).

Its model name, ``mess-ai-bench/overhead-probe``, is what the store's provenance and manifest record, so features
from a probe run can never pass for MERT's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mess_ai.features.device import resolve_device
from mess_ai.features.loaded import LoadedModel
from mess_ai.features.random_checkpoints import mert_config

OVERHEAD_PROBE = "mess-ai-bench/overhead-probe"
# A hub-style name is pinned to a commit in the content key; the probe's is this one (no hub is ever asked).
PROBE_REVISION = "0" * 40

_MERT = mert_config("base")


def conv_frames(samples: int, kernels: tuple[int, ...], strides: tuple[int, ...]) -> int:
    """Frames out of a stack of unpadded 1-D convolutions: 120,000 samples (5 s at 24 kHz) -> 374 for MERT."""
    for kernel, stride in zip(kernels, strides):
        samples = (samples - kernel) // stride + 1
    return samples


@dataclass(frozen=True)
class OverheadProbeModel(LoadedModel):
    """The overhead probe: MERT-v1-95M's input and output shapes, none of its work."""

    conv_kernel: tuple[int, ...] = tuple(_MERT["conv_kernel"])
    conv_stride: tuple[int, ...] = tuple(_MERT["conv_stride"])

    def hidden_states(self, input_values: torch.Tensor) -> torch.Tensor:
        """input_values float32 [batch, samples] -> zeros float32 [batch, num_hidden_states, frames, hidden_size]."""
        frames = conv_frames(input_values.shape[1], self.conv_kernel, self.conv_stride)
        row = torch.zeros(1, 1, 1, self.hidden_size, device=input_values.device)
        return row.expand(input_values.shape[0], self.num_hidden_states, frames, self.hidden_size)


def overhead_probe(name: str = OVERHEAD_PROBE, revision: str | None = None, device: str = "cpu", *,
                   trust_remote_code: bool = False) -> OverheadProbeModel:
    """A model loader (same signature as ``get_model``) that hands out the overhead probe."""
    return OverheadProbeModel(
        model=torch.nn.Identity(), name=name, revision=revision, device=resolve_device(device),
        sampling_rate=_MERT["sample_rate"], do_normalize=False, num_hidden_states=_MERT["num_hidden_layers"] + 1,
        hidden_size=_MERT["hidden_size"], source_dir=Path(name))


def refuse_model(*args: Any, **kwargs: Any) -> LoadedModel:
    """A model loader for runs that must not load any model (the no-op benchmark)."""
    raise AssertionError("the model was loaded, but nothing was new")
